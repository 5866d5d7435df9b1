"""Beside LiteLLM and TensorZero: the same HTTP load against four systems on one machine.

The systems, each started, measured and stopped in turn (only one runs at a time), all in
front of one fake OpenAI server that answers at once (``local.fake_openai``, its own
process):

- ``direct``: the fake LLM itself, the floor.
- ``litellm``: LiteLLM's proxy, one worker, a master key, cost tracking (custom prices,
  ``x-litellm-response-cost``) and a budget on the deployment (``max_budget`` and
  ``budget_duration`` in ``litellm_params``: enforced in memory). Key, user and proxy-wide
  budgets need LiteLLM's Postgres database, which does not run here.
- ``tensorzero``: TensorZero's Rust gateway as its PyPI package embeds it
  (``tensorzero._start_http_gateway``), with cost per response configured; no ClickHouse
  (no observability) and no Postgres/Valkey (no rate or spend limits).
- ``platform``: every service of ours as its own process (budget, spawner, loader, router,
  improvement, analytics, gateway) on a broker of the bench's own, loaded through the
  gateway's ``POST /v1/chat/completions`` with a key of one goal.

The load comes from this one process (asyncio + aiohttp): concurrency 1, concurrency 32,
and an open-loop sweep (request *i* is sent at ``start + i / rate`` whatever the earlier
ones are doing; its latency runs from that scheduled time). A rate is sustained when
every request got a 200 and p99 stayed under 250 ms; the sweep climbs until the first
rate that is not, then bisects. CPU is read from ``/proc`` for every process of a system
(the broker included for ours) before and after each step; memory is the resident set.

LiteLLM and TensorZero come from the optional extra ``peers`` (``pip install -e
'.[peers]'``) or from a side environment (``.local/peers-venv``, or ``PEERS_PYTHON``);
without them the bench says so and measures the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._hops import render_hops  # noqa: E402
from bench._platform import process_cpu_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "litellm"
SYSTEMS = ("direct", "litellm", "tensorzero", "platform")
PLATFORM_SERVICES = ("analytics", "budget", "spawner", "loader", "router", "improvement")
MAX_P99_MS = 250.0
CPU_RATE = 40.0  # the rate the CPU target is set at
LITELLM_VERSION = "1.108.7"
TENSORZERO_VERSION = "2026.6.0"
MASTER_KEY = "sk-bench-master"


# -- pure parts: percentiles, the sweep's rule, the ratio table ------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1): the smallest value with at least q of them at
    or below it. 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 2),
        "p95": round(percentile(values, 0.95), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values), 2) if values else 0.0,
    }


def sustained(sent: int, ok: int, p99_ms: float, max_p99_ms: float = MAX_P99_MS) -> bool:
    """A step holds when every request sent got its 200 and p99 stayed under the bound."""
    return sent > 0 and ok == sent and p99_ms < max_p99_ms


def next_rate(
    history: Sequence[tuple[float, bool]],
    ladder: Sequence[float],
    refine: int,
    always: float | None = CPU_RATE,
) -> float | None:
    """The sweep's next rate, or None to stop.

    ``history`` is (rate, held) in the order tried. Up the ladder until a rate does not
    hold; then the ``always`` rate if it is on the ladder and not yet tried (the CPU
    target is read there); then up to ``refine`` bisections between the highest rate that
    held below the lowest failure and that failure (whole rates; stops when no new one
    fits between).
    """
    tried = {rate for rate, _ in history}
    failed = [rate for rate, held in history if not held]
    if not failed:
        return next((rate for rate in ladder if rate not in tried), None)
    if always is not None and always in ladder and always not in tried:
        return always
    if sum(1 for rate, _ in history if rate not in ladder) >= refine:
        return None
    low_fail = min(failed)
    below = [rate for rate, held in history if held and rate < low_fail]
    if not below:
        return None
    lo = max(below)
    mid = float(round((lo + low_fail) / 2))
    return None if mid <= lo or mid >= low_fail or mid in tried else mid


def max_sustained(history: Sequence[tuple[float, bool]]) -> tuple[float, bool]:
    """(highest rate that held below the lowest that did not, whether no rate failed: then
    the number is a floor set by the ladder's top, not the system's limit)."""
    failed = [rate for rate, held in history if not held]
    limit = min(failed) if failed else math.inf
    held = [rate for rate, ok in history if ok and rate < limit]
    return (max(held) if held else 0.0), not failed


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


# (label, path into a system's result, format, lower is better)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("c=1 p50 ms", "c1.latency_ms.p50", "{:.1f}", True),
    ("c=1 p95 ms", "c1.latency_ms.p95", "{:.1f}", True),
    ("c=1 p99 ms", "c1.latency_ms.p99", "{:.1f}", True),
    ("c=1 overhead p50 ms", "c1.overhead_ms.p50", "{:.1f}", True),
    ("c=1 overhead p99 ms", "c1.overhead_ms.p99", "{:.1f}", True),
    ("c=32 req/s", "c32.answered_per_s", "{:.0f}", False),
    ("c=32 p50 ms", "c32.latency_ms.p50", "{:.1f}", True),
    ("c=32 p95 ms", "c32.latency_ms.p95", "{:.1f}", True),
    ("c=32 p99 ms", "c32.latency_ms.p99", "{:.1f}", True),
    ("c=32 overhead p50 ms", "c32.overhead_ms.p50", "{:.1f}", True),
    ("c=32 errors", "c32.errors_total", "{:.0f}", True),
    ("max sustained req/s", "max_sustained_per_s", "{:.0f}", False),
    (f"CPU ms/req at {CPU_RATE:.0f}/s", "cpu_ms_per_request_at_40", "{:.2f}", True),
    ("CPU ms/req at c=32", "c32.cpu_ms_per_request", "{:.2f}", True),
    ("idle CPU % of a core", "idle.cpu_percent_of_core", "{:.2f}", True),
    ("idle CPU %, just started", "idle_after_start.cpu_percent_of_core", "{:.2f}", True),
    ("RSS MB idle", "rss_mb.idle", "{:.0f}", True),
    ("RSS MB after load", "rss_mb.after", "{:.0f}", True),
)


def lookup(result: Mapping[str, Any], path: str) -> float | None:
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def ratio_rows(
    results: Mapping[str, Mapping[str, Any]], reference: str = REFERENCE
) -> list[list[str]]:
    """Rows of the comparison: metric, one column per system, then each other system's
    value divided by the reference's (``-`` where either is missing or the reference is 0)."""
    systems = list(results)
    others = [s for s in systems if s != reference]
    rows = [["", *systems, *(f"{s}/{reference}" for s in others)]]
    for label, path, fmt, _ in METRICS:
        values = {s: lookup(results[s], path) for s in systems}
        row = [label, *("-" if values[s] is None else fmt.format(values[s]) for s in systems)]
        for s in others:
            r = ratio(values[s], values.get(reference))
            row.append("-" if r is None else f"{r:.2f}x")
        rows.append(row)
    return rows


def render(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def targets(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's targets for the platform against LiteLLM from the same run."""
    ours, peer = results.get("platform"), results.get(REFERENCE)
    if ours is None:
        return []

    def get(res: Mapping[str, Any] | None, path: str) -> float | None:
        return None if res is None else lookup(res, path)

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    def both(a: float | None, b: float | None, test: Callable[[float, float], bool]) -> str:
        return verdict(None if a is None or b is None else test(a, b))

    o50, l50 = get(ours, "c1.overhead_ms.p50"), get(peer, "c1.overhead_ms.p50")
    o99, l99 = get(ours, "c1.overhead_ms.p99"), get(peer, "c1.overhead_ms.p99")
    orate, lrate = get(ours, "max_sustained_per_s"), get(peer, "max_sustained_per_s")
    ocpu, lcpu = get(ours, "cpu_ms_per_request_at_40"), get(peer, "cpu_ms_per_request_at_40")
    idle = get(ours, "idle.cpu_percent_of_core")
    return [
        {
            "target": "overhead p50 at c=1 <= 0.6x LiteLLM's",
            "ours": o50,
            "litellm": l50,
            "verdict": both(o50, l50, lambda a, b: a <= 0.6 * b),
        },
        {
            "target": "overhead p99 at c=1 below LiteLLM's",
            "ours": o99,
            "litellm": l99,
            "verdict": both(o99, l99, lambda a, b: a < b),
        },
        {
            "target": "max sustained (p99 < 250 ms, no errors) >= 3x LiteLLM's",
            "ours": orate,
            "litellm": lrate,
            # Nothing sustained is no target met, also when LiteLLM sustained nothing either.
            "verdict": both(orate, lrate, lambda a, b: a > 0 and a >= 3 * b),
        },
        {
            "target": f"CPU per request at {CPU_RATE:.0f}/s <= half LiteLLM's",
            "ours": ocpu,
            "litellm": lcpu,
            "verdict": both(ocpu, lcpu, lambda a, b: a <= 0.5 * b),
        },
        {
            "target": "idle platform (broker included) < 3% of one core",
            "ours": idle,
            "litellm": get(peer, "idle.cpu_percent_of_core"),
            "verdict": verdict(None if idle is None else idle < 3.0),
        },
        {
            "target": "resident memory reported",
            "ours": get(ours, "rss_mb.idle"),
            "litellm": get(peer, "rss_mb.idle"),
            "verdict": "reported",
        },
    ]


# -- processes: CPU and memory from /proc ---------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


Processes = Callable[[], dict[str, list[int]]]
"""A system's processes right now: a name (a service, ``broker``, ...) -> its pids."""


def cpu_by_name(procs: Processes) -> dict[str, float]:
    return {name: sum(process_cpu_s(p) for p in pids) for name, pids in procs().items()}


def rss_by_name(procs: Processes) -> dict[str, float]:
    return {name: round(sum(rss_mb(p) for p in pids), 1) for name, pids in procs().items()}


# -- the load generator ---------------------------------------------------------------------


@dataclass
class Target:
    """Where and what to POST; ``model`` names the fake LLM as this system knows it."""

    url: str
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self, i: int) -> bytes:
        # A different text each time: no cache (ours or a peer's) answers from memory.
        text = f"Why does my python function raise a KeyError? case {i}"
        body = {"model": self.model, "messages": [{"role": "user", "content": text}]}
        return json.dumps(body).encode()


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)


class Progress:
    """One line on stderr that says what runs; rewritten in place on a terminal."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def say(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last > 0.3:
                sys.stderr.write("\r\033[K" + text)
                sys.stderr.flush()
                self._last = now
        elif force:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def done(self, text: str) -> None:
        self.say(text, force=True)
        if self.enabled and self.tty:
            sys.stderr.write("\n")


async def _one(
    http: aiohttp.ClientSession, target: Target, i: int, started: float, out: Outcome
) -> None:
    out.sent += 1
    loop = asyncio.get_running_loop()
    try:
        async with http.post(
            target.url,
            data=target.body(i),
            headers={"Content-Type": "application/json", **target.headers},
        ) as response:
            await response.read()
            if response.status != 200:
                out.errors[f"http {response.status}"] += 1
                return
            tier = response.headers.get("x-orchestrator-tier")
            if tier:
                out.tiers[tier] += 1
    except TimeoutError:
        out.errors["timeout"] += 1
        return
    except aiohttp.ClientError as exc:
        out.errors[type(exc).__name__] += 1
        return
    out.latencies_ms.append((loop.time() - started) * 1000.0)


async def closed_loop(
    http: aiohttp.ClientSession,
    target: Target,
    concurrency: int,
    count: int,
    offset: int,
    progress: Callable[[Outcome], None],
) -> Outcome:
    """``count`` requests from ``concurrency`` workers, each sending its next one when its
    answer arrives."""
    out = Outcome()
    loop = asyncio.get_running_loop()
    numbers = iter(range(offset, offset + count))

    async def worker() -> None:
        for i in numbers:
            await _one(http, target, i, loop.time(), out)
            progress(out)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def open_loop(
    http: aiohttp.ClientSession,
    target: Target,
    rate: float,
    seconds: float,
    offset: int,
    progress: Callable[[Outcome], None],
) -> Outcome:
    """Request i at ``start + i / rate``, whatever the others are doing; its latency runs
    from that scheduled time, so a late sender counts against the system too."""
    out = Outcome()
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * seconds))
    start = loop.time() + 0.05
    tasks = []
    for n in range(count):
        at = start + n / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(http, target, offset + n, at, out)))
        progress(out)
    await asyncio.gather(*tasks)
    return out


@dataclass
class System:
    """A running system: how to reach it and which processes it is."""

    name: str
    target: Target
    procs: Processes
    notes: list[str] = field(default_factory=list)
    # The platform's: each hop of the runs received between two wall-clock times (ms).
    hops: Callable[[int, int], Awaitable[list[dict[str, Any]]]] | None = None


class Runner:
    """Runs the measurements against one system after another."""

    def __init__(self, args: argparse.Namespace, progress: Progress) -> None:
        self.args = args
        self.progress = progress
        self.offset = 0

    def _numbers(self, count: int) -> int:
        start, self.offset = self.offset, self.offset + count
        return start

    async def step(
        self,
        system: System,
        http: aiohttp.ClientSession,
        label: str,
        *,
        concurrency: int | None = None,
        count: int = 0,
        rate: float | None = None,
        seconds: float = 0.0,
    ) -> dict[str, Any]:
        """One closed-loop (``concurrency``) or open-loop (``rate``) step with its CPU."""
        total = count if concurrency else max(1, int((rate or 0) * seconds))
        offset = self._numbers(total)
        began = time.monotonic()

        def tick(out: Outcome) -> None:
            bad = sum(out.errors.values())
            self.progress.say(
                f"[{system.name}] {label}: {out.ok + bad}/{total} done, {out.sent} sent, "
                f"{bad} errors, {time.monotonic() - began:.0f} s"
            )

        cpu0, client0, wall0 = cpu_by_name(system.procs), time.process_time(), time.monotonic()
        if concurrency:
            out = await closed_loop(http, system.target, concurrency, count, offset, tick)
        else:
            assert rate is not None
            out = await open_loop(http, system.target, rate, seconds, offset, tick)
        wall = time.monotonic() - wall0
        client = time.process_time() - client0
        cpu1 = cpu_by_name(system.procs)
        cpu = {name: cpu1[name] - cpu0.get(name, 0.0) for name in cpu1}
        answered = max(out.ok, 1)
        lat = latency_summary(out.latencies_ms)
        result: dict[str, Any] = {
            "sent": out.sent,
            "answered": out.ok,
            "errors": dict(out.errors),
            "errors_total": sum(out.errors.values()),
            "seconds": round(wall, 2),
            "answered_per_s": round(out.ok / wall, 1) if wall > 0 else 0.0,
            "latency_ms": lat,
            "cpu_ms_per_request": round(sum(cpu.values()) * 1000 / answered, 3),
            "cpu_ms_per_request_by_process": {
                k: round(v * 1000 / answered, 3) for k, v in sorted(cpu.items())
            },
            "load_generator_cpu_ms_per_request": round(client * 1000 / answered, 3),
        }
        if concurrency:
            result["concurrency"] = concurrency
        else:
            result["rate"] = rate
            result["held"] = sustained(out.sent, out.ok, lat["p99"])
        if out.tiers:
            result["tiers"] = dict(out.tiers)
        mark = "" if concurrency else (" held" if result["held"] else " NOT held")
        self.progress.done(
            f"[{system.name}] {label}: {out.ok}/{out.sent} answered, "
            f"p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms, "
            f"{result['cpu_ms_per_request']:.2f} CPU ms/req{mark}"
        )
        return result

    async def idle(self, system: System, seconds: float) -> dict[str, Any]:
        self.progress.say(f"[{system.name}] idle for {seconds:.0f} s", force=True)
        cpu0, wall0 = cpu_by_name(system.procs), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, wall = cpu_by_name(system.procs), time.monotonic() - wall0
        by = {name: (cpu1[name] - cpu0.get(name, 0.0)) * 100 / wall for name in cpu1}
        return {
            "seconds": round(wall, 1),
            "cpu_percent_of_core": round(sum(by.values()), 2),
            "by_process": {k: round(v, 2) for k, v in sorted(by.items())},
        }

    async def settle(self, system: System, floor_percent: float, limit_s: float) -> float:
        """Wait until the system's CPU falls back near its idle floor (a backlog left by an
        overload goes on after the client gave up) or ``limit_s`` passes; returns the wait."""
        began = time.monotonic()
        while time.monotonic() - began < limit_s:
            cpu0, wall0 = sum(cpu_by_name(system.procs).values()), time.monotonic()
            await asyncio.sleep(3.0)
            used = sum(cpu_by_name(system.procs).values()) - cpu0
            percent = used * 100 / (time.monotonic() - wall0)
            self.progress.say(f"[{system.name}] settling: {percent:.0f}% of a core")
            if percent <= max(1.5 * floor_percent, floor_percent + 3.0):
                break
        return round(time.monotonic() - began, 1)

    async def measure(self, system: System, direct: Mapping[str, Any] | None) -> dict[str, Any]:
        a = self.args
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=a.timeout)
        result: dict[str, Any] = {"notes": system.notes}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await self.step(system, http, "warm-up c=4", concurrency=4, count=a.warm)
            await asyncio.sleep(1.0)
            result["rss_mb_by_process"] = {"idle": rss_by_name(system.procs)}
            result["idle_after_start"] = await self.idle(system, a.idle_seconds)
            floor = result["idle_after_start"]["cpu_percent_of_core"]
            c1_from = int(time.time() * 1000)
            result["c1"] = await self.step(system, http, "c=1", concurrency=1, count=a.c1)
            if system.hops is not None:
                result["c1"]["hops"] = await system.hops(c1_from, int(time.time() * 1000))
            result["c32"] = await self.step(system, http, "c=32", concurrency=32, count=a.c32)
            # What c=32 left behind (the platform's analytics and learning) settles first.
            result["settled_before_sweep_s"] = await self.settle(system, floor, a.settle_limit)
            history: list[tuple[float, bool]] = []
            steps: list[dict[str, Any]] = []
            rate = next_rate(history, a.rates, a.refine)
            while rate is not None:
                # After a rate that did not hold, let the backlog drain before the next one.
                await asyncio.sleep(a.pause)
                if history and not history[-1][1]:
                    waited = await self.settle(system, floor, a.settle_limit)
                    result.setdefault("settled_s", []).append(waited)
                row = await self.step(
                    system, http, f"open loop {rate:g}/s", rate=rate, seconds=a.step_seconds
                )
                steps.append(row)
                history.append((rate, bool(row["held"])))
                rate = next_rate(history, a.rates, a.refine)
            result["sweep"] = steps
            best, capped = max_sustained(history)
            result["max_sustained_per_s"] = best
            result["max_sustained_is_ladder_top"] = capped
            at40 = [s for s in steps if s["rate"] == CPU_RATE]
            if at40:
                result["cpu_ms_per_request_at_40"] = at40[0]["cpu_ms_per_request"]
                result["cpu_ms_per_request_at_40_by_process"] = at40[0][
                    "cpu_ms_per_request_by_process"
                ]
            result["rss_mb_by_process"]["after"] = rss_by_name(system.procs)
            # Idle once the load is over and its backlog drained: the steady state.
            await asyncio.sleep(a.pause)
            result["settled_before_idle_s"] = await self.settle(system, floor, a.settle_limit)
            result["idle"] = await self.idle(system, a.idle_seconds)
        result["rss_mb"] = {
            k: round(sum(v.values()), 1) for k, v in result["rss_mb_by_process"].items()
        }
        if direct is not None:
            for key in ("c1", "c32"):
                mine, base = result[key]["latency_ms"], direct[key]["latency_ms"]
                result[key]["overhead_ms"] = {
                    q: round(mine[q] - base[q], 2) for q in ("p50", "p95", "p99")
                }
        return result


# -- the systems ----------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_http(
    url: str, what: str, proc: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited {proc.returncode} before it answered")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status < 500:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")
            await asyncio.sleep(0.25)


@contextlib.contextmanager
def _process(
    argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=dict(env or os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _printed_url(proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> str:
    """The first line starting with ``http`` that ``proc`` wrote to ``log``."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        url = next((x.strip() for x in text.splitlines() if x.startswith("http")), "")
        if url:
            return url
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {text[-2000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def fake_llm(workdir: Path) -> Iterator[tuple[str, int]]:
    """The fake OpenAI server in its own process: (base URL, pid)."""
    argv = [sys.executable, "-m", "local.fake_openai", "--port", "0"]
    log = workdir / "fake_llm.log"
    with _process(argv, log) as proc:
        yield _printed_url(proc, log, "the fake LLM", 30), proc.pid


def peer_python(module: str) -> str | None:
    """A Python that can import ``module``: this one, ``PEERS_PYTHON``, or .local/peers-venv."""
    candidates = [
        sys.executable,
        os.environ.get("PEERS_PYTHON", ""),
        str(ROOT / ".local" / "peers-venv" / "bin" / "python"),
    ]
    for python in filter(None, candidates):
        if not Path(python).exists():
            continue
        check = (
            f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        )
        if subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
            return python
    return None


def litellm_config(fake_url: str, budget_usd: float) -> str:
    """One deployment of the fake LLM with its prices (cost tracking) and a budget on it.

    Prices are the platform's default table's order of magnitude; only the tracking cost
    matters here, not the amounts.
    """
    return (
        "model_list:\n"
        "  - model_name: fake\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o-mini\n"
        f"      api_base: {fake_url}\n"
        "      api_key: bench-key\n"
        "      input_cost_per_token: 0.00000015\n"
        "      output_cost_per_token: 0.0000006\n"
        f"      max_budget: {budget_usd}\n"
        "      budget_duration: 1d\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
    )


TENSORZERO_CONFIG = """\
[gateway]
observability.enabled = false

[models.fake]
routing = ["fake"]

[models.fake.providers.fake]
type = "openai"
model_name = "gpt-4o-mini"
api_base = "{fake_url}/"
api_key_location = "env::OPENAI_API_KEY"
cost = [
  {{ pointer = "/usage/prompt_tokens", cost_per_million = 0.15, required = true }},
  {{ pointer = "/usage/completion_tokens", cost_per_million = 0.60, required = true }},
]
"""

# Runs in the peers' Python: the gateway (Rust, in this process) on a free port.
TENSORZERO_MAIN = """\
import sys, time, tensorzero
gateway = tensorzero._start_http_gateway(config_file=sys.argv[1], clickhouse_url=None,
    postgres_url=None, valkey_url=None, async_setup=False)
print(gateway.base_url, flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.asynccontextmanager
async def run_litellm(python: str, fake_url: str, workdir: Path):  # type: ignore[no-untyped-def]
    port = _free_port()
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(fake_url, budget_usd=1_000_000.0))
    exe = Path(python).parent / "litellm"
    argv = [
        str(exe),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    with _process(argv, workdir / "litellm.log", env) as proc:
        await _wait_http(f"http://127.0.0.1:{port}/health/liveliness", "litellm", proc, 180)
        target = Target(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            "fake",
            {"Authorization": f"Bearer {MASTER_KEY}"},
        )
        yield System(
            "litellm",
            target,
            lambda: {"litellm": descendants(proc.pid)},
            [
                f"LiteLLM {LITELLM_VERSION} proxy, one worker (uvicorn), master key; cost per "
                "response from custom prices; budget on the deployment (litellm_params.max_budget, "
                "budget_duration 1d), enforced in memory. Key/user/proxy-wide budgets need its "
                "Postgres database (not run here).",
            ],
        )


@contextlib.asynccontextmanager
async def run_tensorzero(python: str, fake_url: str, workdir: Path):  # type: ignore[no-untyped-def]
    config = workdir / "tensorzero.toml"
    config.write_text(TENSORZERO_CONFIG.format(fake_url=fake_url))
    script = workdir / "tensorzero_main.py"
    script.write_text(TENSORZERO_MAIN)
    env = {**os.environ, "OPENAI_API_KEY": "bench-key", "RUST_LOG": "error"}
    log = workdir / "tensorzero.log"
    with _process([python, str(script), str(config)], log, env) as proc:
        base = await asyncio.to_thread(_printed_url, proc, log, "tensorzero's gateway", 60)
        target = Target(f"{base}/chat/completions", "tensorzero::model_name::fake")
        notes = [
            f"tensorzero {TENSORZERO_VERSION} from PyPI: its Rust gateway embedded in one "
            "Python process (tensorzero._start_http_gateway, what patch_openai_client uses); "
            "cost per response configured; no ClickHouse (no observability), no Postgres or "
            "Valkey (no rate or spend limits).",
        ]
        yield System("tensorzero", target, lambda: {"tensorzero": descendants(proc.pid)}, notes)


@contextlib.asynccontextmanager
async def run_platform(fake_url: str, workdir: Path, shared_broker: bool, progress: Progress):  # type: ignore[no-untyped-def]
    from bench._hops import read_hops
    from bench._platform import BenchPlatform, broker_pid
    from bench.chaos import OwnBroker
    from streams.client import OrchestratorClient
    from streams.config import JudgeSettings

    broker: OwnBroker | None = None
    if not shared_broker:
        broker = OwnBroker(workdir / "broker")
        progress.say(
            f"[platform] starting the bench's own broker on {broker.bootstrap}", force=True
        )
        await asyncio.to_thread(broker.up)
        os.environ.update(broker.client_env())
    port = _free_port()
    env = {
        "OPENAI_BASE_URL": fake_url,
        "ORCH_ROUTER_POLICY": "static",
        "ORCH_BUDGET_MAX_CONCURRENT": "10000",
        "ORCH_BUDGET_MAX_DAILY_COST": "1000000",
        "ORCH_BUDGET_MAX_QUEUE": "100000",
        "ORCH_GATEWAY_PORT": str(port),
        "ORCH_GATEWAY_MAX_IN_FLIGHT": "4096",
        "ORCH_IMPROVE_PORT": "off",
    }
    try:
        progress.say("[platform] starting the services", force=True)
        async with BenchPlatform(env=env, data_dir=workdir / "data") as platform:
            for name in PLATFORM_SERVICES:
                if not platform.instances_of(name):
                    platform.start_service(name)
            gateway = platform.start_service("gateway")
            root = f"http://127.0.0.1:{port}"
            await _wait_http(f"{root}/health", "the gateway", gateway.proc, 120)
            async with OrchestratorClient(platform.settings, source="bench-peers") as client:
                key, _ = await client.create_key("bench-peers", "bench")
            bpid = broker.pid() if broker else broker_pid(platform.settings.bootstrap)

            def procs() -> dict[str, list[int]]:
                out = {p.label: [p.pid] for p in platform.procs if p.alive and p.pid}
                if bpid:
                    out["broker"] = [bpid]
                return out

            target = Target(
                f"{root}/v1/chat/completions", "auto", {"Authorization": f"Bearer {key}"}
            )
            # The first answers spawn the goal's agent: wait for one before measuring.
            deadline = time.monotonic() + 120
            async with aiohttp.ClientSession() as http:
                while True:
                    platform.check_alive()
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.post(
                            target.url,
                            data=target.body(-1),
                            headers={"Content-Type": "application/json", **target.headers},
                        ) as r:
                            await r.read()
                            if r.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the platform gave no answer within 120 s")
                    await asyncio.sleep(0.5)
            notes = [
                "every service its own process ("
                + ", ".join(sorted(procs()))
                + "); "
                + (
                    "the shared broker (its CPU includes others' traffic)"
                    if shared_broker
                    else "a broker of the bench's own (no other traffic)"
                )
                + "; static routing; goal limits raised so no request is refused; the judge "
                + f"grades {JudgeSettings.from_env().sample:g} of the answers (ORCH_JUDGE_SAMPLE; "
                + "each graded answer is one more LLM call and three more events: its spend "
                + "hold asked and decided, the call).",
            ]

            async def hops(since_ms: int, until_ms: int) -> list[dict[str, Any]]:
                return await read_hops(platform.settings, since_ms, until_ms)

            yield System("platform", target, procs, notes, hops)
    finally:
        if broker is not None:
            for name in broker.client_env():
                os.environ.pop(name, None)
            await asyncio.to_thread(broker.down)


# -- the run --------------------------------------------------------------------------------


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    runner = Runner(args, progress)
    out: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "save")},
        "machine": {"cores": os.cpu_count(), "load_average_before": _load_average()},
        "systems": {},
        "skipped": {},
    }
    pythons = {"litellm": peer_python("litellm"), "tensorzero": peer_python("tensorzero")}
    workdir = Path(tempfile.mkdtemp(prefix="orch-peers-", dir=ROOT / ".local"))
    out["workdir"] = str(workdir)
    with fake_llm(workdir) as (fake_url, fake_pid):
        direct = System(
            "direct",
            Target(f"{fake_url}/chat/completions", "gpt-4o-mini"),
            lambda: {"fake_llm": [fake_pid]},
            ["local.fake_openai in its own process, answers at once"],
        )
        wanted = [s for s in SYSTEMS if s in args.systems]
        base: dict[str, Any] | None = None
        for name in wanted:
            if name == "direct":
                base = await runner.measure(direct, None)
                out["systems"]["direct"] = base
                continue
            if name in pythons and pythons[name] is None:
                version = LITELLM_VERSION if name == "litellm" else TENSORZERO_VERSION
                reason = (
                    f"{name} is not installed: pip install -e '.[peers]' (or a side "
                    f"venv at .local/peers-venv with {name}=={version})"
                )
                progress.done(f"[{name}] skipped: {reason}")
                out["skipped"][name] = reason
                continue
            cm: Any
            if name == "litellm":
                cm = run_litellm(str(pythons["litellm"]), fake_url, workdir)
            elif name == "tensorzero":
                cm = run_tensorzero(str(pythons["tensorzero"]), fake_url, workdir)
            else:
                cm = run_platform(fake_url, workdir, args.shared_broker, progress)
            try:
                async with cm as system:
                    result = await runner.measure(system, base)
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                progress.done(f"[{name}] failed: {exc}")
                out["skipped"][name] = f"failed: {exc}"
                continue
            out["systems"][name] = result
    out["machine"]["load_average_after"] = _load_average()
    out["targets"] = targets(out["systems"])
    keep_only_logs(workdir)
    return out


def keep_only_logs(workdir: Path) -> None:
    """Remove the state the systems of a finished run left below ``workdir``: the broker's
    partitions, ClickHouse's and Faust's files (20-70 MB a run, never read again). The
    processes' logs stay."""
    for state in ("broker/kafka/data", "data/clickhouse", "data/clickhouse-ingest", "data/faust"):
        shutil.rmtree(workdir / state, ignore_errors=True)


def report(out: Mapping[str, Any]) -> str:
    systems = out["systems"]
    lines = [
        render(ratio_rows(systems))
        if REFERENCE in systems
        else render(ratio_rows(systems, next(iter(systems))))
    ]
    for name, reason in out["skipped"].items():
        lines.append(f"{name}: not measured: {reason}")
    if out["targets"]:
        lines.append("")
        lines.append("issue 11 targets (platform against LiteLLM, same run):")
        for t in out["targets"]:
            ours = "-" if t["ours"] is None else f"{t['ours']:.2f}"
            peer = "-" if t["litellm"] is None else f"{t['litellm']:.2f}"
            lines.append(f"  {t['verdict']:8} {t['target']}: ours {ours}, LiteLLM {peer}")
    ours = systems.get("platform")
    if ours:
        lines.append("")
        lines.append(
            "platform per process: CPU ms/req at 40/s and at c=32, idle % of a core, RSS MB"
        )
        rows = [["process", "at 40/s", "at c=32", "idle %", "started", "RSS idle", "RSS after"]]
        at40 = ours.get("cpu_ms_per_request_at_40_by_process", {})
        c32 = ours["c32"]["cpu_ms_per_request_by_process"]
        idle = ours["idle"]["by_process"]
        started = ours["idle_after_start"]["by_process"]
        rss = ours["rss_mb_by_process"]
        for proc in sorted(rss["idle"], key=lambda p: -rss["idle"][p]):
            rows.append(
                [
                    proc,
                    f"{at40.get(proc, 0):.2f}",
                    f"{c32.get(proc, 0):.2f}",
                    f"{idle.get(proc, 0):.2f}",
                    f"{started.get(proc, 0):.2f}",
                    f"{rss['idle'].get(proc, 0):.0f}",
                    f"{rss['after'].get(proc, 0):.0f}",
                ]
            )
        lines.append(render(rows))
        lines.extend(render_hops(ours["c1"].get("hops", [])))
        if ours["c1"].get("tiers"):
            lines.append(f"answer tiers at c=1: {ours['c1']['tiers']}")
    for name, res in systems.items():
        for note in res.get("notes", []):
            lines.append(f"{name}: {note}")
    m = out["machine"]
    lines.append(
        f"{m['cores']} cores; load average before {m['load_average_before']}, after "
        f"{m['load_average_after']}; the load generator is this one Python process."
    )
    return "\n".join(lines)


def parse_rates(text: str) -> list[float]:
    rates = sorted({float(x) for x in text.split(",") if x.strip()})
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("rates are positive numbers, e.g. 10,20,40")
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 4 minutes)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"which to measure, of {','.join(SYSTEMS)}"
    )
    parser.add_argument("--rates", type=parse_rates, help="the sweep's ladder, req/s")
    parser.add_argument("--step-seconds", type=float, help="seconds per open-loop rate")
    parser.add_argument("--refine", type=int, help="bisections after the first failing rate")
    parser.add_argument("--c1", type=int, help="requests at concurrency 1")
    parser.add_argument("--c32", type=int, help="requests at concurrency 32")
    parser.add_argument("--idle-seconds", type=float, help="idle CPU window per system")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument(
        "--shared-broker",
        action="store_true",
        help="the platform on the shared local broker instead of its own",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--save", type=Path, help="also write the JSON results to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "rates": [20.0, 40.0, 80.0, 160.0, 320.0, 640.0]
        if quick
        else [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0],
        "step_seconds": 4.0 if quick else 10.0,
        "refine": 0 if quick else 2,
        "c1": 100 if quick else 500,
        "c32": 320 if quick else 1600,
        "idle_seconds": 10.0 if quick else 30.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.warm = 40
    args.settle_limit = 60.0 if quick else 180.0
    args.pause = 1.0 if quick else 2.0
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    progress = Progress(enabled=not args.quiet)
    out = asyncio.run(run(args, progress))
    if args.save:
        args.save.write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str) if args.json else report(out))


if __name__ == "__main__":
    main()
