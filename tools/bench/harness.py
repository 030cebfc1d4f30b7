"""Benchmark the stream agent against plain pika relays on the same broker, in one run.

Rows. Baselines (``relays.py``, pika only): ``plain`` async-confirm relay
(SelectConnection, prefetch 200, ack ``multiple`` once the republish is
confirmed); ``plain-hdr``, the same relay putting the agent's output headers on
every message (what DESIGN's header set costs without the agent; informational);
``naive`` (BlockingConnection, publish, wait for the confirm, ack, per message);
``spawn`` (sequential ``subprocess.run(["tr", "a-z", "A-Z"])`` per message,
unconfirmed publish, ack). Agent (``python -m streamboss.agent``): service mode
with a Python cat-like line filter and with ``stdbuf -oL tr a-z A-Z``;
per-message mode with ``tr a-z A-Z`` at the default concurrency and at 2/4.
Each relay, baseline or agent, runs as its own process and is timed the same way
from outside, so the harness's own work never shares a GIL with it.

What is timed (throughput). For every row the harness declares fresh streams
(durable topic exchanges ``sb.stream.bench-*-in``/``-out``), the operation queue
``sb.op.bench-*`` bound ``#`` to the input stream, and a durable capture queue
bound ``#`` to the output stream. It prefills the operation queue with N
persistent 100-byte lowercase bodies (untimed), waits until the broker and the
machine are quiet, and only then starts the relay under test. It then polls the
capture queue's depth (AMQP passive declare, every 5 ms) and takes the window
from the first poll that sees any output to the first poll that sees all N. The
rate is the number of messages that arrived in the capture queue between those
two polls divided by the time between them. Process start, connection set-up and
the agent's start-up (exchange checks, spawning its child) fall before the window;
nothing is subtracted. Afterwards the relay is stopped (a baseline exits after
its N-th ack; the agent gets SIGTERM and drains) and the row is checked:
operation queue empty, capture queue holding exactly N. Rows run round-robin,
``--rounds`` times; the table shows medians, ratios are of medians, and the
targets also show the ratio within each round.

Latency. The relay under test runs on fresh queues; a separate publisher process
sends stamped 100-byte bodies (``time.monotonic_ns()`` taken just before
``basic_publish``) to the input stream at a fixed rate; the harness consumes the
capture queue (auto-ack) and records ``monotonic_ns() - stamp``. The first second
(``--quick``: half a second) is warm-up and dropped; then 10 s (2.5 s) are kept.

CPU. user+system time from /proc, over the same window: the relay process with
its live descendants (the service child) and its reaped children (per-message
``tr``); the broker's ``beam.smp``; the harness (and latency publisher); and
"other", the rest of the machine's busy time. The machine is shared, so a window
in which other work used more than a quarter of a core is flagged.

With a manager (``managed.py``): ``demand`` and ``demand-chain`` time how long a
new consumer on an idle operation's (or a 3-operation chain's) output waits for
its first output; ``scale`` and ``scale-wait`` time how fast a manager scales out
on a prefilled backlog and drains it, against the same with one agent. They run
after the others; ``--rows`` selects them like any row, ``--no-manager`` skips them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pika
import pika.channel
import pika.exceptions
from pika.spec import Basic

from tools.bench import managed, report, storage
from tools.bench.probe import Admin, CpuMark, CpuMeter, Names, find_broker_pid
from tools.bench.relays import DEFAULT_URL, parameters, parse_stamped

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent.parent
RELAYS = BENCH_DIR / "relays.py"

# A cat-like line filter: copies stdin lines to stdout, one unbuffered write per line.
CAT_CODE = "import sys\nfor line in sys.stdin.buffer:\n    sys.stdout.buffer.write(line)\n"
CAT_EXEC = shlex.join([sys.executable, "-u", "-c", CAT_CODE])
TR_SERVICE_EXEC = "stdbuf -oL tr a-z A-Z"
TR_EXEC = "tr a-z A-Z"
# The agent's per-message default (agent/config.py: AgentConfig.concurrency).
DEFAULT_CONCURRENCY = 2 * max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Row:
    """One relay under test."""

    key: str
    label: str
    relay: str | None = None  # relays.py kind, for a baseline
    mode: str | None = None  # agent --mode
    command: str | None = None  # agent --exec
    extra: tuple[str, ...] = ()  # more agent options
    n_full: int = 0
    n_quick: int = 0

    @property
    def is_agent(self) -> bool:
        return self.relay is None

    def count(self, quick: bool) -> int:
        return self.n_quick if quick else self.n_full


def rows() -> list[Row]:
    per_message = [Row("pm", f"agent per-message tr (default, c={DEFAULT_CONCURRENCY})",
                       mode="per-message", command=TR_EXEC, n_full=6_000, n_quick=1_500)]
    for concurrency in (2, 4):
        if concurrency != DEFAULT_CONCURRENCY:
            per_message.append(Row(
                f"pm-c{concurrency}", f"agent per-message tr --concurrency {concurrency}",
                mode="per-message", command=TR_EXEC, extra=("--concurrency", str(concurrency)),
                n_full=6_000, n_quick=1_500))
    return [
        Row("plain", "plain relay (async confirms, ack on confirm)", relay="plain",
            n_full=100_000, n_quick=20_000),
        Row("plain-hdr", "plain relay + the agent's output headers", relay="plain-headers",
            n_full=60_000, n_quick=15_000),
        Row("naive", "naive relay (confirm each, blocking)", relay="naive",
            n_full=10_000, n_quick=2_000),
        Row("spawn", "sequential spawn loop (subprocess.run tr)", relay="spawn",
            n_full=5_000, n_quick=1_000),
        Row("svc-cat", "agent service, python cat filter", mode="service", command=CAT_EXEC,
            n_full=80_000, n_quick=20_000),
        Row("svc-tr", f"agent service, {TR_SERVICE_EXEC}", mode="service",
            command=TR_SERVICE_EXEC, n_full=80_000, n_quick=20_000),
        *per_message,
    ]


# (row key, publish rate) for the latency measurements.
LATENCY_PLAN = [("plain", 500.0), ("svc-cat", 500.0), ("svc-tr", 500.0),
                ("spawn", 200.0), ("pm", 200.0)]


@dataclass
class Context:
    url: str
    run_id: str
    quick: bool
    admin: Admin
    meter: CpuMeter
    log_dir: Path
    poll: float
    settle_timeout: float
    failures: list[str] = field(default_factory=list)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


# -- starting and stopping the relay under test ------------------------------------------------


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: TextIO

    def stop(self, graceful: bool, exits_by_itself: bool = False) -> None:
        """SIGTERM (the agent drains) unless it exited already; kill after a grace period.

        ``exits_by_itself``: a baseline relay with ``--count`` finishes its last acks
        and exits; give it time to do so before signalling it.
        """
        proc = self.proc
        if exits_by_itself and proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        if proc.poll() is None:
            if graceful:
                proc.send_signal(signal.SIGTERM)
            else:
                proc.kill()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")


def start_relay(ctx: Context, row: Row, names: Names, count: int, tag: str) -> Running:
    env = dict(os.environ, STREAMBOSS_BROKER_URL=ctx.url)
    if row.is_agent:
        assert row.mode and row.command
        argv = [sys.executable, "-m", "streamboss.agent", "--operation", names.operation,
                "--input", names.input, "--output", names.output, "--exec", row.command,
                "--mode", row.mode, *row.extra]
    else:
        assert row.relay
        argv = [sys.executable, str(RELAYS), row.relay, "--queue", names.queue,
                "--exchange", names.output_exchange, "--count", str(count)]
    log_path = ctx.log_dir / f"{row.key}-{tag}.log"
    log = log_path.open("w+")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                            cwd=REPO_ROOT)
    return Running(proc, log_path, log)


def self_report(text: str) -> dict[str, Any]:
    """The JSON line a baseline relay prints on exit (its own view of the time)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {}


# -- throughput ----------------------------------------------------------------------------------


def throughput(ctx: Context, row: Row, round_no: int) -> dict[str, Any]:
    n = row.count(ctx.quick)
    names = Names.fresh(ctx.run_id, f"{row.key}-t{round_no}")
    admin = ctx.admin
    result: dict[str, Any] = {"row": row.key, "round": round_no, "n": n,
                              "load_1min_before": loadavg()}
    running: Running | None = None
    admin.setup(names)
    try:
        result["prefill_s"] = round(admin.prefill(names, n), 2)
        settled, waited = ctx.meter.settle(ctx.settle_timeout)
        result.update(settled=settled, settle_s=round(waited, 1))
        running = start_relay(ctx, row, names, n, f"t{round_no}")
        first, last = watch(ctx, names, n, running)
        relay_cores, broker_cores = CpuMeter.cores(first[1], last[1])
        other_cores = CpuMeter.other_cores(first[1], last[1])
        elapsed = last[1].at - first[1].at
        moved = last[0] - first[0]
        rate = moved / elapsed
        result.update(
            rate=rate, window_s=elapsed, window_msgs=moved,
            relay_cores=relay_cores, broker_cores=broker_cores, other_cores=other_cores,
            harness_cores=CpuMeter.harness_cores(first[1], last[1]),
            relay_us_per_msg=relay_cores / rate * 1e6, broker_us_per_msg=broker_cores / rate * 1e6,
        )
        running.stop(graceful=True, exits_by_itself=not row.is_agent)
        if not row.is_agent:
            own = self_report(running.output())
            if own.get("t_done"):
                result["self_timed_rate"] = own["n"] / (own["t_done"] - own["t_consume"])
        left, _ = admin.depth(names.queue)
        captured, _ = admin.depth(names.capture)
        result.update(left_in_queue=left, captured=captured)
        if left or captured != n:
            note = f"{row.key} round {round_no}: queue left {left}, capture {captured} (N={n})"
            result["check"] = note
            ctx.failures.append(note)
        progress(f"  {row.key:8} round {round_no}: {rate:9,.0f} msg/s over {elapsed:5.2f} s, "
                 f"relay {relay_cores:.2f} cores, broker {broker_cores:.2f}, "
                 f"harness {result['harness_cores']:.2f}, other {other_cores:.2f}"
                 f"{'' if settled else ' (machine was busy before the start)'}"
                 f"{'  ' + result['check'] if 'check' in result else ''}")
    except Exception as exc:
        note = f"{row.key} round {round_no}: {exc}"
        ctx.failures.append(note)
        result["error"] = str(exc)
        progress(f"  {note}")
        if running is not None:
            running.stop(graceful=False)
            progress("    log tail: " + running.output()[-1500:].replace("\n", "\n    "))
    finally:
        if running is not None and running.proc.poll() is None:
            running.stop(graceful=False)
        admin.teardown(names)
    return result


def watch(ctx: Context, names: Names, n: int,
          running: Running) -> tuple[tuple[int, CpuMark], tuple[int, CpuMark]]:
    """Poll the capture queue; return (count, mark) at the first output and at the N-th."""
    admin, meter, pid = ctx.admin, ctx.meter, running.proc.pid
    first: tuple[int, CpuMark] | None = None
    startup_deadline = time.monotonic() + 60
    deadline = math.inf
    exited_at: float | None = None
    while True:
        count, _ = admin.depth(names.capture)
        if first is None and count > 0:
            first = (count, meter.mark(pid))
            # Generous: the slowest row moves a few hundred messages a second.
            deadline = first[1].at + 60 + n / 50
        if count >= n:
            assert first is not None
            return first, (count, meter.mark(pid))
        now = time.monotonic()
        if first is None and now > startup_deadline:
            raise RuntimeError("no output within 60 s of starting the relay")
        if now > deadline:
            raise RuntimeError(f"only {count} of {n} outputs before the deadline")
        if running.proc.poll() is not None:
            exited_at = exited_at or now
            if now - exited_at > 3:
                raise RuntimeError(f"relay exited ({running.proc.returncode}) with {count} of "
                                   f"{n} outputs")
        time.sleep(ctx.poll)


# -- latency ---------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency(ctx: Context, row: Row, rate: float, round_no: int) -> dict[str, Any]:
    warmup, measure = (0.5, 2.5) if ctx.quick else (1.0, 10.0)
    names = Names.fresh(ctx.run_id, f"{row.key}-l{int(rate)}-{round_no}")
    admin = ctx.admin
    total = round(rate * (warmup + measure))
    warm = round(rate * warmup)
    result: dict[str, Any] = {"row": row.key, "rate": rate, "round": round_no, "warmup_s": warmup,
                              "measure_s": measure, "load_1min_before": loadavg()}
    running: Running | None = None
    publisher: subprocess.Popen[bytes] | None = None
    consumer = pika.BlockingConnection(parameters(ctx.url))
    admin.setup(names)
    try:
        running = start_relay(ctx, row, names, 0, f"l{int(rate)}-{round_no}")
        if not admin.wait_consumer(names.queue, 60):
            raise RuntimeError("the relay did not start consuming within 60 s")
        time.sleep(0.5)  # let a service child finish starting
        settled, waited = ctx.meter.settle(ctx.settle_timeout)
        result.update(settled=settled, settle_s=round(waited, 1))
        latencies: list[int] = []
        seen: set[int] = set()
        marks: list[CpuMark] = []
        duplicates = 0
        pid = running.proc.pid
        meter = ctx.meter
        helpers: list[int] = []

        def on_message(_ch: pika.channel.Channel, _method: Basic.Deliver,
                       _props: pika.BasicProperties, data: bytes) -> None:
            nonlocal duplicates
            now = time.monotonic_ns()
            stamp, seq = parse_stamped(data)
            if seq in seen:
                duplicates += 1
                return
            seen.add(seq)
            if seq >= warm:
                if not latencies:
                    marks.append(meter.mark(pid, tuple(helpers)))
                latencies.append(now - stamp)
                if len(latencies) == total - warm:
                    marks.append(meter.mark(pid, tuple(helpers)))

        channel = consumer.channel()
        channel.basic_consume(names.capture, on_message, auto_ack=True)
        publisher = subprocess.Popen(
            [sys.executable, str(RELAYS), "publish", "--exchange", names.input_exchange,
             "--rate", str(rate), "--seconds", str(warmup + measure)],
            stdout=subprocess.PIPE, env=dict(os.environ, STREAMBOSS_BROKER_URL=ctx.url))
        helpers.append(publisher.pid)
        published_at: float | None = None
        while len(seen) < total:
            consumer.process_data_events(time_limit=0.05)
            if publisher.poll() is not None:
                published_at = published_at or time.monotonic()
                if time.monotonic() - published_at > 5:
                    break
        if len(marks) == 1:
            marks.append(meter.mark(pid, tuple(helpers)))
        out, _ = publisher.communicate(timeout=30)
        pub = self_report(out.decode(errors="replace"))
        values = sorted(v / 1e6 for v in latencies)
        result.update(
            n=len(values), lost=total - len(seen), duplicates=duplicates,
            p50_ms=percentile(values, 0.50), p99_ms=percentile(values, 0.99),
            p999_ms=percentile(values, 0.999), max_ms=values[-1] if values else math.nan,
            mean_ms=statistics.fmean(values) if values else math.nan,
            publisher_late_over_1ms=pub.get("late_over_1ms"),
            publisher_late_over_10ms=pub.get("late_over_10ms"),
        )
        if len(marks) == 2 and values:
            relay_cores, broker_cores = CpuMeter.cores(marks[0], marks[1])
            achieved = len(values) / max(marks[1].at - marks[0].at, 1e-9)
            result.update(relay_cores=relay_cores, broker_cores=broker_cores,
                          other_cores=CpuMeter.other_cores(marks[0], marks[1]),
                          harness_cores=CpuMeter.harness_cores(marks[0], marks[1]),
                          relay_us_per_msg=relay_cores / achieved * 1e6)
        if result["lost"]:
            ctx.failures.append(f"latency {row.key}@{rate:g}/s round {round_no}: "
                                f"{result['lost']} lost")
        progress(f"  {row.key:8} @{rate:4.0f}/s round {round_no}: p50 {result['p50_ms']:.2f} ms, "
                 f"p99 {result['p99_ms']:.2f} ms, p99.9 {result['p999_ms']:.2f} ms "
                 f"({len(values)} msgs, {result['lost']} lost, other "
                 f"{result.get('other_cores', math.nan):.2f} cores)")
    except Exception as exc:
        note = f"latency {row.key}@{rate:g}/s round {round_no}: {exc}"
        ctx.failures.append(note)
        result["error"] = str(exc)
        progress(f"  {note}")
        if running is not None:
            progress("    log tail: " + running.output()[-1500:].replace("\n", "\n    "))
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
            publisher.wait()
        if running is not None:
            running.stop(graceful=True)
        with contextlib.suppress(Exception):
            consumer.close()
        admin.teardown(names)
    return result


# -- summary -----------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and min/max) of each figure over the rounds that succeeded."""
    good = [r for r in runs if "rate" in r]
    summary: dict[str, Any] = {"rounds": len(runs), "succeeded": len(good)}
    for key in ("rate", "relay_cores", "broker_cores", "other_cores", "harness_cores",
                "relay_us_per_msg",
                "broker_us_per_msg", "self_timed_rate"):
        values = [r[key] for r in good if key in r]
        if values:
            summary[key] = statistics.median(values)
            summary[f"{key}_min"] = min(values)
            summary[f"{key}_max"] = max(values)
    return summary


LATENCY_FIGURES = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms", "relay_cores",
                   "broker_cores", "other_cores", "harness_cores", "relay_us_per_msg")


def summarise_latency(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (row, rate): the median of each figure over the rounds that succeeded."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["row"], run["rate"]), []).append(run)
    summaries = []
    for (key, rate), group in groups.items():
        good = [r for r in group if "p99_ms" in r]
        summary: dict[str, Any] = {"row": key, "rate": rate, "rounds": len(group),
                                   "succeeded": len(good),
                                   "n": sum(r["n"] for r in good),
                                   "lost": sum(r["lost"] for r in good)}
        for figure in LATENCY_FIGURES:
            values = [r[figure] for r in good if figure in r]
            if values:
                summary[figure] = statistics.median(values)
        if len(good) > 1:
            summary["p99_ms_all"] = [r["p99_ms"] for r in good]
        if not good:
            summary["error"] = "; ".join(str(r.get("error")) for r in group)
        summaries.append(summary)
    return summaries


def machine_info(admin: Admin, broker_pid: int | None) -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model, "nproc": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "pika": pika.__version__,
        "rabbitmq": admin.server_version, "broker_pid": broker_pid,
        "load_1min_at_start": loadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/bench/run.py",
        description="Throughput and latency of the stream agent against plain pika relays "
                    "on the same broker (RabbitMQ from STREAMBOSS_BROKER_URL or "
                    f"{DEFAULT_URL}).")
    parser.add_argument("--quick", action="store_true",
                        help="small N and short latency runs, one round (about two minutes)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the figures here")
    parser.add_argument("--rounds", type=int, default=None,
                        help="throughput rounds, run round-robin (default 3; --quick 1)")
    parser.add_argument("--latency-rounds", type=int, default=None,
                        help="latency rounds, run round-robin (default 2; --quick 1)")
    parser.add_argument("--rows", metavar="KEYS",
                        help="comma-separated subset of row keys (plain, plain-hdr, naive, "
                             "spawn, svc-cat, svc-tr, pm, pm-cN; with a manager: demand, "
                             "demand-chain, scale, scale-wait; storage: objects, rss, archive, "
                             "replay); ratios need their reference rows")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument("--no-manager", action="store_true",
                        help="skip the rows that start a manager (demand*, scale*)")
    parser.add_argument("--no-storage", action="store_true",
                        help="skip the object-storage, archive and replay rows")
    parser.add_argument("--demand-repeats", type=int, default=None,
                        help="demand-reaction samples per row (default 5; --quick 2)")
    parser.add_argument("--scale-rounds", type=int, default=None,
                        help="scale-out rounds, each a scaled and a single-agent run "
                             "(default 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    latency_rounds = 0 if args.no_latency else (args.latency_rounds or (1 if args.quick else 2))
    url = os.environ.get("STREAMBOSS_BROKER_URL") or DEFAULT_URL
    all_rows = rows()
    manager_keys = set() if args.no_manager else set(managed.KEYS)
    storage_keys = set() if args.no_storage else set(storage.KEYS)
    if args.rows:
        wanted = {key.strip() for key in args.rows.split(",")}
        unknown = wanted - {row.key for row in all_rows} - set(managed.KEYS) - set(storage.KEYS)
        if unknown:
            print(f"unknown row(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        all_rows = [row for row in all_rows if row.key in wanted]
        manager_keys &= wanted
        storage_keys &= wanted
    demand_repeats = args.demand_repeats or (2 if args.quick else 5)
    scale_rounds = args.scale_rounds or 1
    by_key = {row.key: row for row in all_rows}
    try:
        admin = Admin(url)
    except pika.exceptions.AMQPError as exc:
        print(f"bench: cannot reach the broker at {url}: {exc!r}", file=sys.stderr)
        return 2
    broker_pid = find_broker_pid()
    ctx = Context(url=url, run_id=uuid.uuid4().hex[:6], quick=args.quick, admin=admin,
                  meter=CpuMeter(broker_pid),
                  log_dir=Path(tempfile.mkdtemp(prefix="streamboss-bench-")),
                  poll=0.005, settle_timeout=3.0 if args.quick else 6.0)
    info = machine_info(admin, broker_pid)
    started = time.monotonic()
    progress(f"bench run {ctx.run_id}: {'quick' if args.quick else 'full'}, "
             f"{rounds if all_rows else 0} throughput round(s), "
             f"{latency_rounds if set(by_key) & {k for k, _ in LATENCY_PLAN} else 0} latency "
             "round(s), manager rows "
             f"{', '.join(sorted(manager_keys)) or 'none'}; logs in {ctx.log_dir}")
    throughput_runs: dict[str, list[dict[str, Any]]] = {row.key: [] for row in all_rows}
    latency_runs: list[dict[str, Any]] = []
    demand: dict[str, Any] = {}
    scale: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    try:
        for round_no in range(1, rounds + 1 if all_rows else 1):
            progress(f"throughput, round {round_no} of {rounds}")
            for row in all_rows:
                throughput_runs[row.key].append(throughput(ctx, row, round_no))
        plan = [(key, rate) for key, rate in LATENCY_PLAN if key in by_key]
        for round_no in range(1, latency_rounds + 1 if plan else 1):
            progress(f"latency, round {round_no} of {latency_rounds}")
            for key, rate in plan:
                latency_runs.append(latency(ctx, by_key[key], rate, round_no))
        if manager_keys & {"demand", "demand-chain"}:
            demand = managed.demand(ctx, manager_keys, demand_repeats)
        if manager_keys & {"scale", "scale-wait"}:
            scale = managed.scale(ctx, manager_keys, scale_rounds)
        if storage_keys:
            stored = storage.storage(url, admin, storage_keys, args.quick, ctx.log_dir)
    except KeyboardInterrupt:
        progress("interrupted; reporting what was measured")
    finally:
        admin.close()
    info["wall_s"] = round(time.monotonic() - started, 1)
    figures = {
        "machine": info,
        "run": {"id": ctx.run_id, "quick": args.quick, "rounds": rounds,
                "latency_rounds": latency_rounds, "demand_repeats": demand_repeats,
                "scale_rounds": scale_rounds,
                "poll_interval_s": ctx.poll},
        "rows": {row.key: {"label": row.label, "n": row.count(args.quick),
                           "summary": summarise(throughput_runs[row.key]),
                           "runs": throughput_runs[row.key]} for row in all_rows},
        "latency": summarise_latency(latency_runs),
        "latency_runs": latency_runs,
        "demand": demand,
        "scale": scale,
        "storage": stored,
        "failures": ctx.failures,
    }
    figures["ratios"], figures["targets"] = report.evaluate(figures)
    print(report.render(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        progress(f"figures written to {args.json}")
    return 1 if ctx.failures else 0
