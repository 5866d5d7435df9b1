"""The analytics sink: the full event log in ClickHouse, the dashboard's metrics, read-only SQL."""

# Submodules, imported on use: the CLI reads through query_server without loading the engine.
__all__ = ["metrics", "query_server", "sink", "store"]
