# Developer entry points: venv, local Kafka, tests, lint, the platform, benchmarks.

PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv up down test lint run bench chaos demo clean

venv: $(STAMP)

# The stamp makes the install re-run only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

up: venv
	$(BIN)/python -m local.localkafka up
	$(BIN)/python -m streams.topics create

# The services `orchestrator up` started first: a broker stopped under them had them
# reconnect to whoever took its port next.
down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m services.cli.main down; fi

# The broker is stopped whatever happens, and the first failing step's exit code is kept.
test: venv
	@rc=0; $(MAKE) --no-print-directory up && $(BIN)/pytest -q || rc=$$?; \
	$(BIN)/python -m local.localkafka down; \
	exit $$rc

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy streams services local

run: venv
	$(BIN)/orchestrator up

# Every bench/*.py is a standalone script; modules starting with "_" are shared helpers.
# The chaos benchmark has its own target (`make chaos`): it fails while an invariant does not hold.
# The restart benchmark too (`make bench-restart`): its 1M-request history takes long to write.
bench: up
	@set -e; for f in bench/*.py; do \
		case "$$(basename $$f)" in _*|chaos.py|restart.py|\*.py) continue;; esac; \
		echo "== $$f"; $(BIN)/python -m bench.$$(basename $$f .py); \
	done

# The same HTTP load on the fake LLM, LiteLLM's proxy, TensorZero's gateway and the platform
# (on a broker of its own); ratios against LiteLLM from the same run. The peers come from
# `pip install -e '.[peers]'` or .local/peers-venv; without them it measures the rest.
# PEERS_ARGS passes options, e.g. `make bench-peers PEERS_ARGS="--quick --json"`.
.PHONY: bench-peers
bench-peers: venv
	$(BIN)/python -m bench.peers $(PEERS_ARGS)

# Time from start to serving, with and without a snapshot, for the router and the improvement
# service after 10k, 100k and 1M past requests. RESTART_ARGS passes options, e.g.
# `make bench-restart RESTART_ARGS=--quick` (10k and 50k) or `RESTART_ARGS="--requests 300000"`.
.PHONY: bench-restart
bench-restart: up
	$(BIN)/python -m bench.restart $(RESTART_ARGS)

# Invariants 1-3 under kills, pauses and broker outages, on a broker of its own (not `up`'s).
# CHAOS_ARGS passes options, e.g. `make chaos CHAOS_ARGS="--minutes 10 --seed 2"`.
CHAOS_ARGS ?= --minutes 3 --seed 1
chaos: venv
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

demo: up
	$(BIN)/orchestrator demo

clean: down
	rm -rf .local .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
