"""A chaos run: N messages through a three-operation chain while agents, their
connections, the manager and the broker fail; then count what came out.

What happens, in order:

1. A manager of the run's own (``streamboss manager``, local dispatcher, a fresh
   state directory in the work directory, a free port) gets four streams, three
   definitions and three operations through its API: ``cat`` (service mode), ``tr
   a-z A-Z`` (per-message) and a per-message program that fails about
   ``--fail-percent`` of its attempts (exit 75) and SIGKILLs its agent on the poison
   message. Before the operations exist the harness binds a durable subscription
   to the chain's output (so it misses nothing and the chain is wanted) and a
   durable copy of the three dead-letter streams.
2. It publishes N numbered 100-byte bodies with publisher confirms, keeping at most
   ``--window`` of them inside the chain, and injects the faults of
   :mod:`tools.chaos.faults` as the outputs come in.
3. After the last fault it waits (``--wait`` seconds at most) until every message
   came out and the poison was dead-lettered, lets the chain go quiet, and reports
   (:mod:`tools.chaos.report`). Everything of the run is then removed from the
   broker; the work directory (logs) stays.

Exit status: 0 when nothing was lost, the poison was dead-lettered within
``max_attempts`` and every fault was done; 1 otherwise; 2 on bad input or when the
broker, its management API or ``rabbitmqctl`` is not there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pika.exceptions

from streamboss.agent.config import redact

from .broker import Admin, BrokerError, rabbitmqctl_problem
from .chain import POLICY, Chain, Manager, ManagerError, agent_pids
from .faults import Fault, Injector, plan
from .ledger import Ledger
from .report import render, summarise

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# Inputs per confirmed publish: big enough to keep the broker busy, small enough
# that faults and progress are looked at several times a second.
CHUNK = 250
# A fault waits at least this long after the previous one, to see outputs flow.
MIN_GAP = 1.0
# After everything came out: quiet this long means nothing more is coming.
SETTLE_QUIET = 5.0
SETTLE_MAX = 30.0
PROGRESS_EVERY = 5.0
# The default --window's ceiling: keeps the slowest operation's agents busy
# (each takes 16 to 200 messages at a time) without piling the run up before it.
WINDOW_MAX = 500
AGENTS_TIMEOUT = 90.0


class Parser(argparse.ArgumentParser):
    """Bad input is one line naming the option and the fix, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"chaos: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="tools/chaos/run.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--messages", type=int, default=20_000, metavar="N", help="messages to send (20000)")
    add("--kills", type=int, default=10, help="agents to kill -9 (10)")
    add("--closes", type=int, default=3,
        help="agent broker connections to close through the management API (3)")
    add("--manager-restarts", type=int, default=2,
        help="manager restarts, SIGTERM and SIGKILL alternately (2)")
    add("--broker-restarts", type=int, default=1,
        help="rabbitmqctl stop_app/start_app cycles; needs rabbitmqctl (1)")
    add("--no-poison", action="store_true", help="do not send the agent-killing message")
    add("--max-attempts", type=int, default=6,
        help="max_attempts of the three operations (6: a healthy message failing 6 times "
             "in a row at 5%% is a 1-in-60-million event)")
    add("--fail-percent", type=float, default=5.0,
        help="chance that one attempt of the third program fails (5)")
    add("--max-agents", type=int, default=2, help="agents per operation at most (2)")
    add("--window", type=int, default=None,
        help="messages published but not yet out of the chain, at most (N/20, at most 500: "
             "small enough that every operation has work after each fault)")
    add("--dedup", type=int, default=10_000, metavar="N",
        help="the consume --dedup window applied to the outputs (10000)")
    add("--fault-gap", type=float, default=30.0, metavar="S",
        help="at most this many seconds between two faults, even if the chain is stalled (30)")
    add("--wait", type=float, default=300.0, metavar="S",
        help="after the last fault, wait this long at most for every message (300)")
    add("--seed", type=int, default=None, help="seed for the choice of agents to hit")
    add("--work-dir", type=Path, default=None,
        help="where the manager's state and the logs go (default: a new temporary directory)")
    add("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    checks = [
        (args.messages >= 1, "--messages must be at least 1"),
        (min(args.kills, args.closes, args.manager_restarts, args.broker_restarts) >= 0,
         "fault counts must be 0 or more"),
        (1 <= args.max_attempts <= 100, "--max-attempts must be between 1 and 100"),
        (0 <= args.fail_percent <= 50, "--fail-percent must be between 0 and 50"),
        (args.max_agents >= 1, "--max-agents must be at least 1"),
        (args.window is None or args.window >= 1, "--window must be at least 1"),
        (args.dedup >= 1, "--dedup must be at least 1"),
        (args.fault_gap > 0 and args.wait > 0, "--fault-gap and --wait must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if args.window is None:
        args.window = max(1, min(WINDOW_MAX, args.messages // 20))
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: directory {args.json.parent} does not exist")
    return args


def progress(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


def preflight(admin: Admin, url: str, broker_restarts: int) -> str | None:
    """Why the run cannot start here (one line with the fix), or None."""
    # A busy broker may miss one handshake; three in a row mean it is not there.
    if not any(admin.amqp_up() or time.sleep(1) for _ in range(3)):
        return (f"cannot reach the broker at {redact(url)}: start RabbitMQ or set "
                "STREAMBOSS_BROKER_URL")
    if not admin.management_up():
        return ("RabbitMQ's management API does not answer on port 15672: enable it with "
                "`rabbitmq-plugins enable rabbitmq_management`")
    if broker_restarts:
        problem = rabbitmqctl_problem()
        if problem is not None:
            return problem
        warning = admin.file_handle_pressure()
        if warning is not None:
            progress(f"warning: {warning}")
    return None


class Run:
    """One chaos run: set up, publish and inject, wait, count, clean up."""

    def __init__(self, args: argparse.Namespace, url: str) -> None:
        self.args = args
        self.url = url
        self.chain = Chain(time.strftime("%H%M%S") + secrets.token_hex(2))
        self.work = args.work_dir or Path(tempfile.mkdtemp(
            prefix=f"streamboss-{self.chain.prefix}-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.admin = Admin(url)
        self.manager = Manager(self.work / "state", url, self.work / "manager.log")
        self.ledger = Ledger(url, self.chain, args.messages, args.dedup)
        self.faults = plan(self.chain, args.kills, args.closes, args.manager_restarts,
                           args.broker_restarts, not args.no_poison)
        self.injector = Injector(self.chain, self.manager, self.admin, args.seed)
        self.published = 0
        self.resent: set[int] = set()
        self.notes: list[str] = []
        self.started = time.time()
        self._progress_at = 0.0

    # -- set-up ----------------------------------------------------------------------

    def declare(self) -> None:
        chain, args = self.chain, self.args
        self.manager.start()
        self.manager.wait_ready()
        if not self.manager.call("GET", "/v1/status").get("demand_observed", False):
            self.notes.append("the manager did not observe demand (management API)")
        for stream in chain.streams:
            self.manager.call("POST", "/v1/streams", json={"name": stream})
        for definition in chain.definitions(self.work, args.max_attempts, args.fail_percent):
            self.manager.call("POST", "/v1/definitions", json=definition)
        # Before the operations exist: from their first output on, everything is kept.
        self.admin.subscribe(chain)
        self.ledger.start()
        policy = {**POLICY, "max": args.max_agents}
        for i, operation in enumerate(chain.operations):
            self.manager.call("POST", "/v1/operations", json={
                "name": operation, "definition": operation, "input": chain.streams[i],
                "output": chain.streams[i + 1], "policy": policy})
        deadline = time.monotonic() + AGENTS_TIMEOUT
        while not all(agent_pids(chain.operations).values()):
            if time.monotonic() > deadline:
                raise ManagerError(f"the operations had no agents {AGENTS_TIMEOUT:.0f} s after "
                                   f"they were declared; see {self.manager.log_path}")
            time.sleep(0.2)

    # -- the run ---------------------------------------------------------------------

    def publish_some(self, pending: list[Fault]) -> bool:
        """Publish the next chunk if the window and the next fault allow; whether any."""
        n, window = self.args.messages, self.args.window
        distinct, _, _ = self.ledger.tally.snapshot()
        # Not far past the next fault's point: when it comes, the chain is loaded.
        cap = n if not pending else min(n, int(pending[0].at * n) + window)
        room = min(cap - self.published, window - (self.published - distinct), CHUNK)
        if room <= 0:
            return False
        first = self.published
        confirmed, error = self.admin.publish(
            self.chain.head, [self.chain.body(seq) for seq in range(first, first + room)])
        self.published += confirmed
        if error is not None:
            # The unconfirmed ones may have arrived; they go again, and are named apart.
            self.resent.update(range(first + confirmed, first + room))
            progress(f"publishing failed after {confirmed} of {room} ({error}); retrying")
            time.sleep(1.0)
        return True

    def show_progress(self, pending: list[Fault], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._progress_at < PROGRESS_EVERY:
            return
        self._progress_at = now
        distinct, deliveries, dead = self.ledger.tally.snapshot()
        agents = agent_pids(self.chain.operations)
        running = " ".join(f"{self.chain.short(op)}:{len(pids)}" for op, pids in agents.items())
        progress(f"+{time.time() - self.started:5.0f}s published {self.published:,} "
                 f"delivered {distinct:,} (+{deliveries - distinct:,} dup) dead {dead} "
                 f"agents {running} faults {len(self.faults) - len(pending)}/{len(self.faults)}")

    def poison_settled(self) -> bool:
        return self.args.no_poison or self.ledger.tally.poison_dead is not None

    def drive(self) -> bool:
        """Publish, inject, and wait for the outputs; False when the deadline passed."""
        n = self.args.messages
        pending = list(self.faults)
        self.started = last_done = time.time()
        faults_over: float | None = None if pending else last_done
        while True:
            self.show_progress(pending)
            now = time.time()
            distinct, _, _ = self.ledger.tally.snapshot()
            if pending:
                fault = pending[0]
                since = now - last_done
                flowing = self.ledger.first_after(self.chain.tail, last_done) is not None
                if (since >= MIN_GAP and flowing and distinct >= fault.at * n) \
                        or since >= self.args.fault_gap:
                    progress(f"+{now - self.started:5.0f}s {fault.kind} ...")
                    self.injector.inject(fault)
                    progress(f"+{time.time() - self.started:5.0f}s {fault.kind}: "
                             f"{fault.detail}")
                    pending.pop(0)
                    last_done = fault.done or time.time()
                    if not pending:
                        faults_over = last_done
                    continue
            elif distinct >= n and self.poison_settled():
                return True
            elif faults_over is not None and now > faults_over + self.args.wait:
                return False
            if not self.publish_some(pending):
                time.sleep(0.1)

    def settle(self) -> None:
        """Wait until no output came for SETTLE_QUIET s: late duplicates get counted."""
        deadline = time.monotonic() + SETTLE_MAX
        while time.monotonic() < deadline:
            times = self.ledger.tally.output.times
            last = times[-1] if times else self.started
            if time.time() - last >= SETTLE_QUIET:
                return
            time.sleep(0.5)

    def recoveries(self) -> tuple[list[tuple[float, int]], list[float | None]]:
        """Fill in each fault's recovery; the poison's kills and the recovery after each."""
        for fault in self.faults:
            # The poison's harm comes when it runs, not when it is published: its
            # recoveries are measured from each agent it killed, below.
            if fault.kind != "poison" and fault.ok and fault.started is not None \
                    and fault.done is not None:
                after = self.ledger.first_after(fault.watch, fault.done)
                fault.recovery = None if after is None else after - fault.started
        kills: list[tuple[float, int]] = []
        with contextlib.suppress(OSError):
            for line in Chain.poison_log(self.work).read_text().splitlines():
                with contextlib.suppress(ValueError):
                    moment, pid = line.split()
                    kills.append((float(moment), int(pid)))
        after_kills: list[float | None] = []
        for moment, _pid in kills:
            after = self.ledger.first_after(self.chain.tail, moment)
            after_kills.append(None if after is None else round(after - moment, 2))
        return kills, after_kills

    # -- clean-up --------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop the manager (it drains its agents), kill what is left of the run's
        agents, stop the consumers, delete the run's queues and exchanges."""
        with contextlib.suppress(Exception):
            self.manager.stop(signal.SIGTERM)
        for pids in agent_pids(self.chain.operations).values():
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.manager.close()
        self.ledger.stop()
        try:
            left = self.admin.delete_run(self.chain.prefix)
        except httpx.HTTPError as exc:
            left = [f"all ({exc})"]
        if left:
            progress(f"could not delete {', '.join(left)}: delete what holds "
                     f"{self.chain.prefix!r} in the management UI")
        self.admin.close()

    def execute(self) -> int:
        progress(f"run {self.chain.run}: {self.args.messages:,} messages, "
                 f"{len(self.faults)} faults; logs in {self.work}")
        summary: dict[str, Any] | None = None
        try:
            self.declare()
            completed = self.drive()
            if completed:
                self.settle()
            self.show_progress([], force=True)
            ended = time.time()
            kills, after_kills = self.recoveries()
            settings = {k: v for k, v in vars(self.args).items()
                        if k not in ("work_dir", "json", "no_poison")}
            settings["poison"] = not self.args.no_poison
            summary = summarise(
                chain=self.chain, settings=settings, faults=self.faults,
                tally=self.ledger.tally, poison_kills=kills, poison_recoveries=after_kills,
                published=self.published, resent=self.resent, started=self.started,
                ended=ended, timed_out=not completed, notes=self.notes)
        except (ManagerError, BrokerError, httpx.HTTPError, pika.exceptions.AMQPError,
                RuntimeError) as exc:
            progress(f"the run could not go on: {type(exc).__name__}: {exc}")
        finally:
            self.cleanup()
        if summary is None:
            return 1
        summary["work_dir"] = str(self.work)
        print(render(summary, str(self.work)), flush=True)
        if self.args.json is not None:
            self.args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return 0 if summary["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = os.environ.get("STREAMBOSS_BROKER_URL") or DEFAULT_URL
    admin = Admin(url)
    try:
        problem = preflight(admin, url, args.broker_restarts)
    finally:
        admin.close()
    if problem is not None:
        print(f"chaos: {problem}", file=sys.stderr)
        return 2
    try:
        return Run(args, url).execute()
    except KeyboardInterrupt:
        return 130
