"""The `orchestrator` command line and the supervisor that runs the services."""

__all__: list[str] = []
