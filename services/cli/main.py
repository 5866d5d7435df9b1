"""The `orchestrator` command line: run the platform, ask it, inspect it, tune budgets."""

from __future__ import annotations

import logging

import typer

from services.cli.admin import budget_app, keys_app
from services.cli.analytics import metrics, sql
from services.cli.bench import bench_app
from services.cli.common import fail
from services.cli.demo import demo_command
from services.cli.platform import agents, down, kafka_env, service, status, up
from services.cli.requests import ask, improve
from services.cli.workflows import workflows_app
from streams.config import DataDirUnsafe, private_files

__all__ = ["app"]

app = typer.Typer(
    name="orchestrator",
    help="Self-improving LLM agent orchestrator on Kafka.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


@app.callback()
def _setup() -> None:
    try:
        private_files()  # and of every process it starts: they inherit the umask
    except DataDirUnsafe as exc:
        fail(str(exc))
    # aiokafka logs every retry while the CLI already reports what failed, in one line.
    for name in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# Each module holds the commands of one purpose; --help lists them in this order.
for command in (up, down, status, service, ask, improve, agents, sql, metrics):
    app.command()(command)
app.command("kafka-env")(kafka_env)
app.command("demo")(demo_command)
app.add_typer(budget_app, name="budget")
app.add_typer(keys_app, name="keys")
# The benchmark commands call into bench/; the demo and the workflow commands have modules.
app.add_typer(bench_app, name="bench")
app.add_typer(workflows_app)  # versions, rollback, replay


if __name__ == "__main__":
    app()
