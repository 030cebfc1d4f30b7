"""Measurements against a real stream manager: demand reaction and scale-out.

Each section starts its own manager (``python -m streamboss.manager manager`` on a
free loopback port, a fresh state directory under the run's log directory, agent
logs in ``<state>/logs/``), declares everything through its HTTP API, and stops it
with SIGTERM at the end (it drains its agents); then the harness deletes the
``sb.stream.*``, ``sb.op.*`` and ``sb.dead.*`` objects it declared.

Demand reaction (rows ``demand`` and ``demand-chain``). An operation running
``tr a-z A-Z`` (per-message), policy ``max 1, idle_seconds 1``, unwanted and at
zero agents. After a random 0-1 s pause (so that the samples do not all fall at
the same phase of the manager's once-a-second reconcile), the harness attaches a
consumer to the output stream (exclusive auto-delete queue bound ``#``,
``basic_consume``), publishes one lowercase message to the input stream right
after the consume-ok (the operation's queue exists, so nothing is lost) and times
consume-ok -> that message's output received. Meanwhile it polls ``GET
/v1/status`` every 100 ms; "agents" is when the status first shows every
operation of the row running (the status is published at the end of a pass, so
this can come after the agent is already consuming). Then it detaches and waits
until the status shows zero agents (running and draining) again: "zero" is
detach -> that. The chain is three such operations, the consumer on the last
output and the message published at the head: the manager has to wake it
backwards.

Scale-out (rows ``scale`` and ``scale-wait``). Policy ``max 4,
target_backlog_per_agent 1000, scale_out_cooldown 1, scale_in_cooldown 5,
idle_seconds 2``; the operation queue is prefilled with N persistent 100-byte
lowercase bodies while the operation is unwanted (untimed), the broker and machine
are let settle, then a consumer attaches (auto-ack) and the harness times attach ->
the status first shows an agent running, -> the status first shows ``max`` agents
running, -> first output, -> N-th output. The drain rate is the outputs after the
first divided by first -> N-th output. The same run with ``max 1`` gives the single
agent's rate; the speed-up is the ratio of the two rates. ``scale`` runs the
CPU-bound per-message ``tr a-z A-Z`` (on a small machine the CPUs, not the agent
count, bound it); ``scale-wait`` a service-mode line filter that waits 1 ms per
record (a program waiting on something else: agents add capacity without CPU).
CPU over attach -> N-th output: the manager with its agents and their children,
the broker, and everything else ("other").
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx
import pika
import pika.channel
import pika.exceptions
from pika.spec import Basic

from streamboss.manager import api_token
from tools.bench.probe import CpuMeter, Names
from tools.bench.relays import PERSISTENT, body, parameters
from tools.bench.report import render_timeline

if TYPE_CHECKING:
    from tools.bench.harness import Context

REPO_ROOT = Path(__file__).resolve().parents[2]

# The row keys this module adds (for --rows).
KEYS = ("demand", "demand-chain", "scale", "scale-wait")

TR_EXEC = "tr a-z A-Z"
WAIT_CODE = ("import sys, time\n"
             "for line in sys.stdin.buffer:\n"
             "    time.sleep(0.001)\n"
             "    sys.stdout.buffer.write(line.upper())\n")
WAIT_EXEC = shlex.join([sys.executable, "-u", "-c", WAIT_CODE])

DEMAND_POLICY = {"min": 0, "max": 1, "idle_seconds": 1}
SCALE_POLICY = {"max": 4, "target_backlog_per_agent": 1000, "scale_out_cooldown": 1,
                "scale_in_cooldown": 5, "idle_seconds": 2}
STATUS_POLL = 0.1
# The manager's reconcile interval (manager/reconciler.py: INTERVAL), for the random
# offset before each demand-reaction attach.
RECONCILE_PERIOD = 1.0


@dataclass(frozen=True)
class ScaleWorkload:
    key: str
    label: str
    definition: dict[str, Any]
    n_full: int
    n_quick: int


SCALE_WORKLOADS = [
    ScaleWorkload("scale", "per-message tr a-z A-Z (CPU-bound)",
                  {"exec": TR_EXEC}, 20_000, 6_000),
    ScaleWorkload("scale-wait", "service, waits 1 ms per record",
                  {"exec": WAIT_EXEC, "mode": "service"}, 20_000, 6_000),
]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# -- the manager -------------------------------------------------------------------------------


class ManagerError(RuntimeError):
    pass


class ManagerProcess:
    """A ``streamboss manager`` child process and an HTTP client for its API."""

    def __init__(self, ctx: Context, tag: str) -> None:
        self.state_dir = ctx.log_dir / f"manager-{tag}"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.state_dir / "manager.log"
        self.log: TextIO = self.log_path.open("w")
        env = dict(os.environ, STREAMBOSS_BROKER_URL=ctx.url)
        env.pop("STREAMBOSS_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamboss.manager", "manager", "--port", str(self.port),
             "--state-dir", str(self.state_dir)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env, cwd=REPO_ROOT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self.streams: set[str] = set()
        self.operations: set[str] = set()
        self.stopped: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 30) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise ManagerError(f"manager exited ({self.proc.returncode}): "
                                   + self.log_tail())
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/v1/health").status_code == 200:
                    self.authorize()
                    return time.monotonic() - started
            time.sleep(0.05)
        raise ManagerError(f"manager not answering on port {self.port} after {timeout:.0f} s")

    def authorize(self) -> None:
        """Send the token the manager generated (it is up, so the file is there)."""
        token = api_token.read(self.state_dir)
        if token is None:
            raise ManagerError(f"no API token in {self.state_dir}")
        self.http.headers["Authorization"] = f"Bearer {token}"

    def log_tail(self, chars: int = 1200) -> str:
        with contextlib.suppress(OSError):
            self.log.flush()
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise ManagerError(f"{method} {path} -> {response.status_code}: {response.text[:300]}")
        return response.json()

    def stream(self, name: str) -> None:
        self.call("POST", "/v1/streams", json={"name": name})
        self.streams.add(name)

    def define(self, name: str, definition: dict[str, Any]) -> None:
        self.call("POST", "/v1/definitions", json={**definition, "name": name})

    def operation(self, name: str, definition: str, input_stream: str, output: str,
                  policy: dict[str, Any]) -> None:
        self.operations.add(name)
        self.streams.update((input_stream, output))
        self.call("POST", "/v1/operations", json={
            "name": name, "definition": definition, "input": input_stream, "output": output,
            "policy": policy})

    def delete_operation(self, name: str) -> None:
        with contextlib.suppress(ManagerError, httpx.HTTPError):
            self.call("DELETE", f"/v1/operations/{name}")

    def status(self) -> dict[str, Any]:
        return self.call("GET", "/v1/status")

    def agents(self) -> dict[str, dict[str, Any]]:
        """Per operation: the status entry (running, draining, desired, backlog, ...)."""
        return {op["name"]: op for op in self.status()["operations"]}

    def wait_idle(self, names: list[str], timeout: float = 60) -> float:
        """Wait until every operation in ``names`` is listed with no agents; seconds waited."""
        started = time.monotonic()
        while True:
            ops = self.agents()
            if all(n in ops and ops[n]["running"] == 0 and ops[n]["draining"] == 0
                   for n in names):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise ManagerError(f"operations {names} not back to zero agents after "
                                   f"{timeout:.0f} s: {[ops.get(n) for n in names]}")
            if self.proc.poll() is not None:
                raise ManagerError(f"manager exited ({self.proc.returncode})")
            time.sleep(STATUS_POLL)

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the manager drains its agents); kill it and its agents if that hangs."""
        result: dict[str, Any] = {}
        self.http.close()
        if self.proc.poll() is None:
            started = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                result["killed"] = True
            result["stop_s"] = round(time.monotonic() - started, 2)
        result["exit_code"] = self.proc.returncode
        # Agents run in their own sessions: after a kill they would outlive the manager.
        left = []
        for pid_file in (self.state_dir / "agents").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"streamboss.agent" in cmdline:
                    os.kill(pid, signal.SIGKILL)
                    left.append(pid)
        if left:
            result["agents_left"] = left
        self.log.close()
        return result


@contextlib.contextmanager
def running_manager(ctx: Context, tag: str) -> Iterator[ManagerProcess]:
    manager = ManagerProcess(ctx, tag)
    try:
        ready = manager.wait_ready()
        progress(f"  manager on port {manager.port} ready in {ready:.1f} s "
                 f"(state and agent logs in {manager.state_dir})")
        status = manager.status()
        if not status.get("demand_observed", False):
            raise ManagerError("the manager does not observe demand (management API?); "
                               "every operation would count as wanted")
        yield manager
    finally:
        stopped = manager.stopped = manager.stop()
        if stopped.get("killed") or stopped.get("exit_code") not in (0, -signal.SIGTERM):
            ctx.failures.append(f"manager {tag}: did not stop cleanly on SIGTERM: {stopped} "
                                f"(log {manager.log_path})")
        if stopped.get("agents_left"):
            ctx.failures.append(f"manager {tag}: agents left running after it stopped: "
                                f"{stopped['agents_left']}")
        delete_objects(ctx, manager.streams, manager.operations)


def delete_objects(ctx: Context, streams: set[str], operations: set[str]) -> None:
    ctx.admin.delete(
        queues=[f"sb.op.{op}" for op in operations] + [f"sb.dead.{op}" for op in operations],
        exchanges=[f"sb.stream.{s}" for s in streams]
        + [f"sb.stream.{op}.dead" for op in operations])


# -- a consumer on an output stream --------------------------------------------------------------


class OutputConsumer:
    """Its own connection; ``attach`` binds an exclusive auto-delete queue and consumes."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(parameters(url))
        self.channel = self.connection.channel()
        self.count = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.first_body: bytes | None = None

    def attach(self, exchange: str) -> float:
        """Return the time of the consume-ok: from then on the stream has a consumer."""
        queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(queue, exchange, routing_key="#")
        self.channel.basic_consume(queue, self._on_message, auto_ack=True)
        return time.monotonic()

    def _on_message(self, _ch: pika.channel.Channel, _method: Basic.Deliver,
                    _props: pika.BasicProperties, data: bytes) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self.first_body = data
        self.last_at = now
        self.count += 1

    def pump(self, seconds: float) -> None:
        self.connection.process_data_events(time_limit=max(seconds, 0))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


# -- demand reaction ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    key: str
    streams: list[str]  # head ... tail
    operations: list[str]

    @property
    def head(self) -> str:
        return self.streams[0]

    @property
    def tail(self) -> str:
        return self.streams[-1]


def declare_chain(manager: ManagerProcess, base: str, key: str, length: int,
                  definition: str) -> Chain:
    streams = [f"{base}-{key}-s{i}" for i in range(length + 1)]
    operations = [f"{base}-{key}-op{i + 1}" for i in range(length)]
    for stream in streams:
        manager.stream(stream)
    for i, op in enumerate(operations):
        manager.operation(op, definition, streams[i], streams[i + 1], DEMAND_POLICY)
    return Chain(key, streams, operations)


def react_once(ctx: Context, manager: ManagerProcess, chain: Chain, rep: int,
               jitter: random.Random) -> dict[str, Any]:
    """One demand-reaction sample: attach, publish one message, time its output."""
    result: dict[str, Any] = {"rep": rep}
    ops = manager.agents()
    busy = {n: ops.get(n) for n in chain.operations
            if n not in ops or ops[n]["running"] or ops[n]["draining"] or ops[n]["wanted"]}
    if busy:
        raise ManagerError(f"not idle before the attach: {busy}")
    ctx.meter.settle(2.0 if ctx.quick else 4.0)
    consumer = OutputConsumer(ctx.url)
    message = body(rep)
    # The manager reconciles about once a second and the idle wait ends just after one of
    # its passes: without a random offset every sample would hit the same phase.
    result["offset_s"] = round(jitter.uniform(0, RECONCILE_PERIOD), 3)
    time.sleep(result["offset_s"])
    try:
        attached = consumer.attach(f"sb.stream.{chain.tail}")
        ctx.admin.channel.basic_publish(f"sb.stream.{chain.head}", "", message, PERSISTENT)
        deadline = attached + 60
        agent_at: float | None = None
        next_poll = attached
        while consumer.first_at is None:
            now = time.monotonic()
            if now > deadline:
                raise ManagerError(f"no output within 60 s of the attach; status: "
                                   f"{[ops.get(n) for n in chain.operations]}")
            if now >= next_poll:
                next_poll = now + STATUS_POLL
                if agent_at is None:
                    ops = manager.agents()
                    if all(ops.get(n, {}).get("running", 0) >= 1 for n in chain.operations):
                        agent_at = time.monotonic()
            consumer.pump(next_poll - time.monotonic())
        result["reaction_s"] = consumer.first_at - attached
        if agent_at is not None:
            result["agent_s"] = agent_at - attached
        expected = message.upper()
        if consumer.first_body != expected:
            result["check"] = f"output {consumer.first_body!r} is not {expected!r}"
            ctx.failures.append(f"{chain.key} rep {rep}: {result['check']}")
    finally:
        consumer.close()
    detached = time.monotonic()
    manager.wait_idle(chain.operations)
    result["zero_s"] = time.monotonic() - detached
    progress(f"  {chain.key:12} rep {rep}: output {result['reaction_s']:.2f} s after the attach "
             f"(agents seen at {result.get('agent_s', float('nan')):.2f} s), back to zero "
             f"{result['zero_s']:.1f} s after the detach")
    return result


def demand(ctx: Context, keys: set[str], repeats: int) -> dict[str, Any]:
    """The demand-reaction rows in ``keys``, ``repeats`` samples each, round-robin."""
    base = f"bench-{ctx.run_id}"
    samples: dict[str, list[dict[str, Any]]] = {}
    chains: list[Chain] = []
    section: dict[str, Any] = {"repeats": repeats, "policy": DEMAND_POLICY, "exec": TR_EXEC}
    jitter = random.Random(ctx.run_id)
    progress("demand reaction (a real manager)")
    manager: ManagerProcess | None = None
    try:
        with running_manager(ctx, "demand") as manager:
            manager.define(f"{base}-upper", {"exec": TR_EXEC})
            for key, length in (("demand", 1), ("demand-chain", 3)):
                if key in keys:
                    chains.append(declare_chain(manager, base, key, length, f"{base}-upper"))
                    samples[key] = []
            manager.wait_idle([op for c in chains for op in c.operations], timeout=15)
            for rep in range(1, repeats + 1):
                for chain in chains:
                    try:
                        samples[chain.key].append(
                            react_once(ctx, manager, chain, rep, jitter))
                    except (ManagerError, httpx.HTTPError, pika.exceptions.AMQPError) as exc:
                        note = f"{chain.key} rep {rep}: {exc}"
                        ctx.failures.append(note)
                        samples[chain.key].append({"rep": rep, "error": str(exc)})
                        progress(f"  {note}\n    manager log tail: {manager.log_tail()}")
                        manager.wait_idle(chain.operations)
    except (ManagerError, httpx.HTTPError, pika.exceptions.AMQPError) as exc:
        note = f"demand: {exc}"
        ctx.failures.append(note)
        section["error"] = str(exc)
        progress(f"  {note}")
    if manager is not None:
        section["manager_stop"] = manager.stopped
    for chain in chains:
        runs = samples[chain.key]
        section[chain.key] = {
            "operations": len(chain.operations), "runs": runs,
            "succeeded": sum(1 for r in runs if "reaction_s" in r),
            **{f"{name}_s": spread([r[f"{name}_s"] for r in runs if f"{name}_s" in r])
               for name in ("reaction", "agent", "zero")},
        }
    return section


# -- scale-out ----------------------------------------------------------------------------------


class Timeline:
    """The operation's status entries over time, one entry per change."""

    def __init__(self, manager: ManagerProcess, operation: str, origin: float,
                 max_agents: int) -> None:
        self.manager = manager
        self.operation = operation
        self.origin = origin
        self.max_agents = max_agents
        # (seconds since the attach, desired, running, draining, backlog) at each change
        self.entries: list[tuple[float, int, int, int, int]] = []
        self.first_agent: float | None = None
        self.max_agent: float | None = None
        self.peak = 0
        self.last: dict[str, Any] | None = None

    def poll(self) -> dict[str, Any] | None:
        op = self.manager.agents().get(self.operation)
        if op is None:
            return None
        seen = time.monotonic() - self.origin
        entry = (round(seen, 2), op["desired"], op["running"], op["draining"], op["backlog"])
        if not self.entries or self.entries[-1][1:4] != entry[1:4]:
            self.entries.append(entry)
        self.peak = max(self.peak, op["running"])
        if self.first_agent is None and op["running"] >= 1:
            self.first_agent = seen
        if self.max_agent is None and op["running"] >= self.max_agents:
            self.max_agent = seen
        self.last = op
        return op


def scale_once(ctx: Context, manager: ManagerProcess, workload: ScaleWorkload, max_agents: int,
               round_no: int, n: int, jitter: random.Random) -> dict[str, Any]:
    base = f"bench-{ctx.run_id}-{workload.key}-m{max_agents}-r{round_no}"
    names = Names(operation=base, input=f"{base}-in", output=f"{base}-out")
    policy = {**SCALE_POLICY, "max": max_agents}
    result: dict[str, Any] = {"max": max_agents, "round": round_no, "n": n, "policy": policy}
    manager.stream(names.input)
    manager.stream(names.output)
    manager.operation(names.operation, f"bench-{ctx.run_id}-{workload.key}", names.input,
                      names.output, policy)
    consumer: OutputConsumer | None = None
    try:
        result["prefill_s"] = round(ctx.admin.prefill(names, n), 2)
        manager.wait_idle([names.operation], timeout=15)
        settled, waited = ctx.meter.settle(3.0 if ctx.quick else 6.0)
        result.update(settled=settled, settle_s=round(waited, 1))
        consumer = OutputConsumer(ctx.url)
        result["offset_s"] = round(jitter.uniform(0, RECONCILE_PERIOD), 3)
        time.sleep(result["offset_s"])
        pid = manager.proc.pid
        start_mark = ctx.meter.mark(pid)
        attached = consumer.attach(names.output_exchange)
        timeline = Timeline(manager, names.operation, attached, max_agents)
        deadline = attached + 90 + n / 100
        next_poll = attached
        while consumer.count < n:
            now = time.monotonic()
            if now > deadline:
                raise ManagerError(f"only {consumer.count} of {n} outputs before the deadline")
            if now >= next_poll:
                next_poll = now + STATUS_POLL
                timeline.poll()
            consumer.pump(next_poll - time.monotonic())
        end_mark = ctx.meter.mark(pid)
        assert consumer.first_at is not None and consumer.last_at is not None
        window = consumer.last_at - consumer.first_at
        agents_cores, broker_cores = CpuMeter.cores(start_mark, end_mark)
        result.update(
            first_agent_s=timeline.first_agent, max_agents_s=timeline.max_agent,
            peak_agents=timeline.peak, first_output_s=consumer.first_at - attached,
            drained_s=consumer.last_at - attached,
            rate=(consumer.count - 1) / window if window > 0 else float("nan"),
            overall_rate=n / (consumer.last_at - attached),
            agents_cores=agents_cores, broker_cores=broker_cores,
            other_cores=CpuMeter.other_cores(start_mark, end_mark),
            harness_cores=CpuMeter.harness_cores(start_mark, end_mark),
            timeline=timeline.entries)
        consumer.pump(0)
        result["received"] = consumer.count
        consumer.close()
        consumer = None
        detached = time.monotonic()
        result["detached_s"] = round(detached - attached, 2)
        # Back to zero: keep recording the status (scale-in, idle, drain) until no agents.
        while True:
            op = timeline.poll()
            if op is not None and op["running"] == 0 and op["draining"] == 0:
                break
            if time.monotonic() - detached > 60:
                raise ManagerError(f"not back to zero agents 60 s after the detach: {op}")
            time.sleep(STATUS_POLL)
        result["zero_s"] = time.monotonic() - detached
        left, _ = ctx.admin.depth(names.queue)
        dead = ctx.admin.depth_if_exists(f"sb.dead.{names.operation}") or 0
        result.update(left_in_queue=left, dead_lettered=dead)
        if left or dead or result["received"] != n:
            note = f"{workload.key} max {max_agents} round {round_no}: queue left {left}, " \
                   f"dead-lettered {dead}, outputs received {result['received']} (N={n})"
            result["check"] = note
            ctx.failures.append(note)
        progress(f"  {workload.key:10} max {max_agents} round {round_no}: first agent "
                 f"{_s(timeline.first_agent)}, max agents {_s(timeline.max_agent)}, drained "
                 f"{n:,} in {result['drained_s']:.1f} s, {result['rate']:,.0f} msg/s; agents "
                 f"{render_timeline(result)}; zero {result['zero_s']:.1f} s after the detach")
    except (ManagerError, httpx.HTTPError, pika.exceptions.AMQPError, RuntimeError) as exc:
        note = f"{workload.key} max {max_agents} round {round_no}: {exc}"
        ctx.failures.append(note)
        result["error"] = str(exc)
        progress(f"  {note}\n    manager log tail: {manager.log_tail()}")
    finally:
        if consumer is not None:
            consumer.close()
        manager.delete_operation(names.operation)
    return result


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


SCALE_FIGURES = ("first_agent_s", "max_agents_s", "peak_agents", "first_output_s", "drained_s",
                 "rate", "overall_rate", "agents_cores", "broker_cores", "other_cores",
                 "zero_s")


def summarise_scale(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "rate" in r]
    summary: dict[str, Any] = {"rounds": len(runs), "succeeded": len(good)}
    for figure in SCALE_FIGURES:
        values = [r[figure] for r in good if r.get(figure) is not None]
        if values:
            summary[figure] = statistics.median(values)
    return summary


def scale(ctx: Context, keys: set[str], rounds: int) -> dict[str, Any]:
    """The scale-out rows in ``keys``: each round the scaled run and the single-agent run."""
    workloads = [w for w in SCALE_WORKLOADS if w.key in keys]
    section: dict[str, Any] = {"rounds": rounds, "policy": SCALE_POLICY}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {
        (w.key, m): [] for w in workloads for m in (SCALE_POLICY["max"], 1)}
    jitter = random.Random(f"{ctx.run_id}-scale")
    progress("scale-out (a real manager)")
    manager: ManagerProcess | None = None
    try:
        with running_manager(ctx, "scale") as manager:
            for workload in workloads:
                manager.define(f"bench-{ctx.run_id}-{workload.key}", workload.definition)
            for round_no in range(1, rounds + 1):
                for workload in workloads:
                    n = workload.n_quick if ctx.quick else workload.n_full
                    for max_agents in (SCALE_POLICY["max"], 1):
                        runs[(workload.key, max_agents)].append(
                            scale_once(ctx, manager, workload, max_agents, round_no, n, jitter))
    except (ManagerError, httpx.HTTPError, pika.exceptions.AMQPError) as exc:
        note = f"scale: {exc}"
        ctx.failures.append(note)
        section["error"] = str(exc)
        progress(f"  {note}")
    if manager is not None:
        section["manager_stop"] = manager.stopped
    for workload in workloads:
        scaled = summarise_scale(runs[(workload.key, SCALE_POLICY["max"])])
        single = summarise_scale(runs[(workload.key, 1)])
        entry: dict[str, Any] = {
            "label": workload.label, "definition": workload.definition,
            "n": workload.n_quick if ctx.quick else workload.n_full,
            "scaled": scaled, "single": single,
            "scaled_runs": runs[(workload.key, SCALE_POLICY["max"])],
            "single_runs": runs[(workload.key, 1)],
        }
        if "rate" in scaled and "rate" in single:
            entry["speedup"] = scaled["rate"] / single["rate"]
            entry["drain_speedup"] = single["drained_s"] / scaled["drained_s"]
        section[workload.key] = entry
    return section
