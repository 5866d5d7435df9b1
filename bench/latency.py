"""End-to-end latency and sustained rate of the platform, open loop, beside a direct openai call."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Runs as `python bench/latency.py` too (as `make bench` used to), not only with -m.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._console import console as bench_console  # noqa: E402
from bench._platform import SERVICES, BenchPlatform, parse_instances  # noqa: E402
from bench._records import commits_by_group, per_answer, record_counts  # noqa: E402
from bench.llm_baseline import measure_direct  # noqa: E402
from streams.client import OrchestratorClient  # noqa: E402

console = bench_console(stderr=True)

# (message, specialty the static keyword policy gives it); every goal asks all of them.
KINDS = (
    ("Why does my python function raise a KeyError? case", "code"),
    ("Summarize this article for me, part", "writing"),
    ("Explain the history of topic", "research"),
    ("I need a refund for my order", "customer_support"),
)
# A system prompt of about the length the spawner writes, so the baseline sends a similar body.
_SYSTEM = "You are a careful specialist. Answer briefly, cite what you rely on, and say so " * 3


@dataclass
class Phase:
    """One open-loop run: what was offered, what came back, how fast, at what CPU cost."""

    name: str
    offered_rps: float
    n: int
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    achieved_rps: float = 0.0
    send_lag_p99_ms: float = 0.0
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)

    @property
    def sustained(self) -> bool:
        """At least 95% of the offered rate answered, p99 under 1 s, under 1% errors."""
        return (
            self.achieved_rps >= 0.95 * self.offered_rps
            and self.p99_ms < 1000.0
            and sum(self.errors.values()) <= 0.01 * self.n
        )


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0 if ordered else 0.0


async def open_loop(
    name: str,
    call: Callable[[int], Awaitable[Any]],
    n: int,
    rate: float,
    progress: Progress,
) -> Phase:
    """Start call(i) at start + i / rate whatever the earlier calls are doing.

    Latency runs from the scheduled time, so a load generator that falls behind
    shows up as latency instead of being hidden (no coordinated omission).
    """
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    last_done = 0.0
    bar = progress.add_task(f"{name} @ {rate:g}/s", total=n)

    async def one(i: int, scheduled: float) -> None:
        nonlocal last_done
        try:
            await call(i)
        except Exception as exc:
            errors[type(exc).__name__] += 1
        else:
            latencies.append(loop.time() - scheduled)
        last_done = max(last_done, loop.time())
        progress.advance(bar)

    tasks: list[asyncio.Task[None]] = []
    start = loop.time() + 0.05
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, loop.time() - scheduled))
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    progress.remove_task(bar)
    ordered = sorted(latencies)
    wall = last_done - start
    return Phase(
        name=name,
        offered_rps=rate,
        n=n,
        ok=len(ordered),
        errors=dict(errors),
        p50_ms=_pct(ordered, 0.50),
        p95_ms=_pct(ordered, 0.95),
        p99_ms=_pct(ordered, 0.99),
        max_ms=ordered[-1] * 1000.0 if ordered else 0.0,
        achieved_rps=len(ordered) / wall if wall > 0 else 0.0,
        send_lag_p99_ms=_pct(sorted(lags), 0.99),
    )


def _message(i: int, goals: int) -> tuple[str, str]:
    """The i-th ask: goals take turns, each goal cycles through every kind; texts never repeat."""
    text, _ = KINDS[(i // goals) % len(KINDS)]
    return f"{text} {i}", f"bench-g{i % goals}"


class _Profiler:
    """py-spy on every service process for one phase, as collapsed stacks (one file each)."""

    def __init__(self, out_dir: Path | None, platform: BenchPlatform) -> None:
        self.out_dir = out_dir
        self.platform = platform
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, tag: str) -> None:
        spy = shutil.which("py-spy")
        if self.out_dir is None or spy is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for p in self.platform.procs:
            if p.alive:
                out = self.out_dir / f"{tag}-{p.name}-{p.index}.txt"
                cmd = [spy, "record", "--pid", str(p.proc.pid), "--format", "raw"]
                cmd += ["--rate", "200", "--nonblocking", "-o", str(out)]
                self.running.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )

    def stop(self) -> None:
        for proc in self.running:
            proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        for proc in self.running:
            proc.wait(30)
        self.running = []


async def measure_platform(
    platform: BenchPlatform, rate: float, n: int, goals: int, progress: Progress
) -> Phase:
    async with OrchestratorClient(platform.settings, source="bench") as client:

        async def ask(i: int) -> None:
            message, goal = _message(i, goals)
            await client.ask(message, goal_id=goal, user_id=f"u{i % 7}", timeout=15)

        cpu0, own0 = platform.cpu_s(), time.process_time()
        phase = await open_loop("platform", ask, n, rate, progress)
        cpu1, own1 = platform.cpu_s(), time.process_time()
    phase.cpu_ms_per_req = {k: (cpu1[k] - cpu0[k]) * 1000.0 / n for k in cpu0}
    phase.cpu_ms_per_req["client"] = (own1 - own0) * 1000.0 / n
    return phase


async def measure_direct_at(
    platform: BenchPlatform, rate: float, n: int, goals: int, progress: Progress
) -> Phase:
    """The raw openai client, no retries, open loop at ``rate`` against the same server."""
    client = openai.AsyncOpenAI(base_url=platform.base_url, api_key="bench", max_retries=0)

    async def call(i: int) -> None:
        message, _ = _message(i, goals)
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": _SYSTEM},
                {"role": "user", "content": message},
            ],
            max_tokens=512,
        )

    try:
        for i in range(20):  # open the connection and warm the client's code paths
            await call(i)
        cpu0, own0 = platform.cpu_s()["fake_llm"], time.process_time()
        phase = await open_loop("direct", call, n, rate, progress)
        cpu1, own1 = platform.cpu_s()["fake_llm"], time.process_time()
    finally:
        await client.close()
    phase.cpu_ms_per_req = {
        "fake_llm": (cpu1 - cpu0) * 1000.0 / n,
        "client": (own1 - own0) * 1000.0 / n,
    }
    return phase


async def warm(platform: BenchPlatform, goals: int, progress: Progress) -> None:
    """Spawn every (goal, kind) agent the load uses, then a short run to open connections."""
    bar = progress.add_task("spawning agents", total=None)
    asks = [_message(g + goals * k, goals) for k in range(len(KINDS)) for g in range(goals)]
    await platform.warm_up(asks)
    progress.remove_task(bar)
    # Gentle enough not to leave a backlog behind on a saturated machine.
    await measure_platform(platform, 20, 60, goals, progress)
    await _settle(platform)


async def _settle(platform: BenchPlatform, timeout: float = 15.0) -> None:
    """Wait until the services are idle again, so one rate's backlog does not bill the next."""
    deadline = time.monotonic() + timeout
    before = sum(v for k, v in platform.cpu_s().items() if k != "fake_llm")
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = sum(v for k, v in platform.cpu_s().items() if k != "fake_llm")
        busy, before = (now - before) / 0.5, now
        if busy < 0.5:  # the platform idles at well under half a core
            return


@dataclass(frozen=True)
class Pause:
    """``--pause budget:2@20``: stop the service's first instance for 2 s, 20 s into each
    rate's run, then let it go on (SIGSTOP, SIGCONT): does the platform catch up?"""

    service: str
    seconds: float
    at: float

    @classmethod
    def parse(cls, spec: str) -> Pause:
        name, _, rest = spec.partition(":")
        seconds, _, at = rest.partition("@")
        try:
            pause = cls(name, float(seconds), float(at))
        except ValueError:
            pause = None
        if (
            pause is None
            or name not in SERVICES
            or not (0 < pause.seconds < 3600 and 0 <= pause.at < 86400)
        ):
            raise argparse.ArgumentTypeError(
                f"bad pause {spec!r}: want SERVICE:SECONDS@AT, SERVICE one of {SERVICES}"
            )
        return pause

    async def run(self, platform: BenchPlatform) -> None:
        await asyncio.sleep(self.at)
        instance = platform.instances_of(self.service)[0]
        platform.launcher.send(instance, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            platform.launcher.send(instance, signal.SIGCONT)


async def _step(
    platform: BenchPlatform,
    args: argparse.Namespace,
    progress: Progress,
    profiler: _Profiler,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    n = args.n or max(300, int(rate * seconds))
    if rate == args.profile_rate:
        profiler.start(f"r{rate:g}")
    pause = asyncio.create_task(args.pause.run(platform)) if args.pause else None
    counts0 = await record_counts(platform.settings.bootstrap, platform.settings.prefix)
    try:
        plat = await measure_platform(platform, rate, n, args.goals, progress)
    finally:
        profiler.stop()
        if pause is not None:
            pause.cancel()  # its SIGCONT runs on the way out
            await asyncio.gather(pause, return_exceptions=True)
    platform.check_alive()
    await _settle(platform)
    counts1 = await record_counts(platform.settings.bootstrap, platform.settings.prefix)
    records = per_answer(counts0.by_topic(), counts1.by_topic(), plat.ok)
    commits = await commits_by_group(platform.settings.bootstrap, counts0, counts1)
    records |= {f"  {k}": v / max(1, plat.ok) for k, v in commits.most_common()}
    direct = await measure_direct_at(platform, rate, n, args.goals, progress)
    status = "sustained" if plat.sustained else "NOT sustained"
    console.print(
        f"{rate:g}/s x {n}: platform p50 {plat.p50_ms:.1f} p99 {plat.p99_ms:.1f} ms, "
        f"{plat.achieved_rps:.0f}/s answered ({status}, {sum(plat.errors.values())} errors); "
        f"direct p50 {direct.p50_ms:.1f} p99 {direct.p99_ms:.1f} ms; "
        f"sender lag p99 {plat.send_lag_p99_ms:.1f} ms; load {os.getloadavg()[0]:.1f}"
    )
    return {"platform": asdict(plat), "direct": asdict(direct), "records_per_answer": records}


async def _measure(
    platform: BenchPlatform, args: argparse.Namespace, progress: Progress, results: dict[str, Any]
) -> None:
    profiler = _Profiler(args.py_spy, platform)
    await warm(platform, args.goals, progress)
    results["baseline_c1"] = await measure_direct(platform.base_url, args.baseline_n, 1)
    passed, failed = 0.0, 0.0
    for rate in sorted(args.rates):
        row = await _step(platform, args, progress, profiler, rate, args.seconds)
        results["rates"].append(row)
        await _settle(platform)
        if Phase(**row["platform"]).sustained:
            passed = rate
            continue
        failed = rate
        if Phase(**row["platform"]).achieved_rps < 0.8 * rate:
            # Far past saturation: a higher rate would only measure a growing backlog.
            results["skipped"] = [r for r in args.rates if r > rate]
            break
    # Narrow the edge between the last sustained and the first failed rate.
    for _ in range(args.refine if failed > passed else 0):
        rate = round((passed + failed) / 2)
        if rate in (passed, failed):
            break
        row = await _step(platform, args, progress, profiler, rate, args.seconds / 2)
        results["refined"].append(row)
        await _settle(platform)
        if Phase(**row["platform"]).sustained:
            passed = rate
        else:
            failed = rate
    results["max_sustained_rps"] = passed


def _max_sustained(rows: list[dict[str, Any]], side: str) -> float:
    ok = [r[side]["offered_rps"] for r in rows if Phase(**r[side]).sustained]
    return max(ok, default=0.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {"ORCH_ROUTER_POLICY": "static", **dict(kv.split("=", 1) for kv in args.env)}
    if args.fetch_wait_ms is not None:
        env["ORCH_FETCH_MAX_WAIT_MS"] = str(args.fetch_wait_ms)
    prefix = "import uvloop; uvloop.install()" if args.uvloop else ""
    load = os.getloadavg()
    results: dict[str, Any] = {
        "rates": [],
        "refined": [],
        "config": {
            "instances": parse_instances(args.instances),
            "env": env,
            "uvloop": args.uvloop,
            "goals": args.goals,
            "pause": asdict(args.pause) if args.pause else None,
            "cpus": os.cpu_count(),
            "loadavg_before": load,
        },
    }
    console.print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    async with BenchPlatform(
        instances=results["config"]["instances"], env=env, python_prefix=prefix
    ) as platform:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            await _measure(platform, args, progress, results)
        results["admitted_by"] = await _admitted_by(platform)
        from bench._hops import read_hops, render_hops

        results["hops"] = await read_hops(platform.settings, 0, int(time.time() * 1000))
        for line in render_hops(results["hops"]):
            console.print(line.replace("at c=1 ", ""))
        console.print(
            "tasks admitted by: "
            + ", ".join(f"{k} {v}" for k, v in sorted(results["admitted_by"].items()))
            + " (router: with an admission token, ORCH_ADMISSION_TOKENS)"
        )
    results["config"]["loadavg_after"] = os.getloadavg()
    results["direct_max_sustained_rps"] = _max_sustained(results["rates"], "direct")
    return results


async def _admitted_by(platform: BenchPlatform) -> dict[str, int]:
    """Runs admitted by the budget and by the router with a token, over the whole run."""
    from streams.registry import read_topics_to_end

    admitted = await read_topics_to_end(platform.settings, ["task_admitted"])
    return dict(Counter(e.source for e in admitted))


def _ms(v: float) -> str:
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def render(results: dict[str, Any]) -> list[Table]:
    """Latency per rate (platform, direct, overhead), then CPU per request per process."""
    rows = sorted(results["rates"] + results["refined"], key=lambda r: r["platform"]["offered_rps"])
    lat = Table(title="end-to-end latency, ms (open loop; overhead = platform - direct)")
    for col in ("offered/s", "answered/s", "errors", "p50", "p95", "p99", "max"):
        lat.add_column(col, justify="right")
    for col in ("direct p50", "p95", "p99", "answered/s", "overhead p50", "p95", "p99"):
        lat.add_column(col, justify="right")
    for row in rows:
        p, d = row["platform"], row["direct"]
        mark = "" if Phase(**p).sustained else " x"
        dmark = "" if Phase(**d).sustained else " x"
        lat.add_row(
            f"{p['offered_rps']:g}",
            f"{p['achieved_rps']:.0f}{mark}",
            str(sum(p["errors"].values())),
            *(_ms(p[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
            *(_ms(d[k]) for k in ("p50_ms", "p95_ms", "p99_ms")),
            f"{d['achieved_rps']:.0f}{dmark}",
            *(_ms(p[k] - d[k]) for k in ("p50_ms", "p95_ms", "p99_ms")),
        )
    b, cfg = results["baseline_c1"], results["config"]
    lat.caption = (
        f"x = not sustained (answered < 95% of offered, p99 >= 1 s or > 1% errors).  "
        f"Max sustained: platform {results['max_sustained_rps']:g}/s, "
        f"direct {results['direct_max_sustained_rps']:g}/s.\n"
        f"Direct openai call, concurrency 1: p50 {b['p50_ms']:.2f} p99 {b['p99_ms']:.2f} ms, "
        f"{b['rps']:.0f}/s, client CPU {b['cpu_ms_per_call']:.2f} ms/call.  "
        f"Load average {cfg['loadavg_before'][0]:.1f} before, {cfg['loadavg_after'][0]:.1f} "
        f"after, {cfg['cpus']} CPUs; instances {cfg['instances']}."
    )
    cpu = Table(title="CPU ms per request sent (all instances of a process kind summed)")
    names = list(rows[0]["platform"]["cpu_ms_per_req"]) if rows else []
    cpu.add_column("offered/s", justify="right")
    for name in [*names, "total", "direct client"]:
        cpu.add_column(name, justify="right")
    for row in rows:
        per = row["platform"]["cpu_ms_per_req"]
        cpu.add_row(
            f"{row['platform']['offered_rps']:g}",
            *(f"{per[k]:.2f}" for k in names),
            f"{sum(per.values()):.1f}",
            f"{row['direct']['cpu_ms_per_req'].get('client', 0.0):.2f}",
        )
    return [lat, cpu, _records_table(rows)]


def _records_table(rows: list[dict[str, Any]]) -> Table:
    """Records the broker appended per answer, by topic, one column per rate."""
    table = Table(title="records appended per answer, by topic (end offsets before and after)")
    table.add_column("topic")
    per = [r.get("records_per_answer", {}) for r in rows]
    for row in rows:
        table.add_column(f"{row['platform']['offered_rps']:g}/s", justify="right")
    topics: dict[str, float] = {}
    for counts in per:
        for topic, n in counts.items():
            topics[topic] = max(topics.get(topic, 0.0), n)
    # Topics by count; under __consumer_offsets (indented), its commits by group: topic.
    main = sorted((t for t in topics if not t.startswith(" ")), key=lambda t: -topics[t])
    for topic in main:
        table.add_row(topic, *(f"{c.get(topic, 0.0):.2f}" for c in per))
        if topic == "__consumer_offsets":
            for sub in sorted((t for t in topics if t.startswith(" ")), key=lambda t: -topics[t]):
                table.add_row(sub, *(f"{c.get(sub, 0.0):.2f}" for c in per))
    total = [sum(v for k, v in c.items() if not k.startswith(" ")) for c in per]
    table.add_row("total", *(f"{t:.2f}" for t in total))
    table.caption = (
        "__consumer_offsets: the services' offset commits (indented: by group and topic); "
        "*-changelog: Faust table writes."
    )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__,
        epilog="e.g. --rates 100 --n 2000 --instances loader=2,router=2 --json; "
        "see docs/performance.md",
    )
    parser.add_argument(
        "--rates", type=lambda s: [float(r) for r in s.split(",")], default=[50, 100, 200, 400]
    )
    parser.add_argument("--rate", dest="rates", type=lambda s: [float(s)], help="one rate")
    parser.add_argument("--n", type=int, default=0, help="asks per rate (default: --seconds)")
    parser.add_argument("--seconds", type=float, default=8.0, help="run length per rate")
    parser.add_argument("--goals", type=int, default=4)
    parser.add_argument("--instances", default="", help="e.g. loader=2,router=2")
    parser.add_argument("--fetch-wait-ms", type=int, help="ORCH_FETCH_MAX_WAIT_MS for services")
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="run services on uvloop (must be importable by them, e.g. --env PYTHONPATH=DIR)",
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for services")
    parser.add_argument("--baseline-n", type=int, default=500)
    parser.add_argument("--refine", type=int, default=3, help="bisection steps past the edge")
    parser.add_argument("--py-spy", type=Path, help="record services with py-spy into DIR")
    parser.add_argument("--profile-rate", type=float, default=100.0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--pause",
        type=Pause.parse,
        help="SERVICE:SECONDS@AT: stop SERVICE for SECONDS, AT seconds into each rate",
    )
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    for table in render(results):
        console.print(table)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
