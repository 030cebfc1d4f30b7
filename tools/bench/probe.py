"""What the harness observes: the broker (topology, queue depths) and CPU time from /proc."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from streamboss.agent.naming import dead_queue, operation_queue_arguments, solo_queue
from tools.bench.relays import PERSISTENT, body, parameters

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Names:
    """The broker objects of one benchmark row; all are deleted after the row."""

    operation: str  # agent operation: queue sb.op.OPERATION, dead stream OPERATION.dead
    input: str  # stream (exchange sb.stream.INPUT)
    output: str  # stream (exchange sb.stream.OUTPUT)

    @classmethod
    def fresh(cls, run_id: str, row: str) -> Names:
        base = f"bench-{run_id}-{row}"
        return cls(operation=base, input=f"{base}-in", output=f"{base}-out")

    @property
    def input_exchange(self) -> str:
        return f"sb.stream.{self.input}"

    @property
    def output_exchange(self) -> str:
        return f"sb.stream.{self.output}"

    @property
    def queue(self) -> str:
        """The operation queue: what the agent (or a baseline relay) consumes."""
        return f"sb.op.{self.operation}"

    @property
    def capture(self) -> str:
        """A durable queue bound to the output stream, where the harness counts outputs."""
        return f"{self.operation}-capture"

    @property
    def dead_exchange(self) -> str:
        return f"sb.stream.{self.operation}.dead"


class Admin:
    """A blocking connection for declaring, prefilling, polling and deleting."""

    def __init__(self, url: str) -> None:
        self.url = url
        # Polls are RPCs, but the harness can sit idle for a while between them.
        self.connection = pika.BlockingConnection(parameters(url, heartbeat=0))
        self.channel: BlockingChannel = self.connection.channel()
        props = self.connection._impl.server_properties or {}
        version = props.get("version", b"?")
        self.server_version = version.decode() if isinstance(version, bytes) else str(version)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()

    def _reopen(self) -> None:
        if not self.channel.is_open:
            self.channel = self.connection.channel()

    def setup(self, names: Names) -> None:
        """Streams, the operation queue bound to the input, a capture queue on the output."""
        ch = self.channel
        for exchange in (names.input_exchange, names.output_exchange):
            ch.exchange_declare(exchange, exchange_type="topic", durable=True)
        # The agent's queue as the agent declares it (a quorum queue).
        ch.queue_declare(names.queue, durable=True,
                         arguments=operation_queue_arguments(names.operation))
        ch.queue_bind(names.queue, names.input_exchange, routing_key="#")
        ch.queue_declare(names.capture, durable=True)
        ch.queue_bind(names.capture, names.output_exchange, routing_key="#")

    def teardown(self, names: Names) -> None:
        self.delete([names.queue, names.capture, solo_queue(names.operation),
                     dead_queue(names.operation)],
                    [names.input_exchange, names.output_exchange, names.dead_exchange])

    def delete(self, queues: list[str], exchanges: list[str]) -> None:
        """Delete these queues and exchanges, ignoring any that are gone already."""
        for queue in queues:
            try:
                self._reopen()
                self.channel.queue_delete(queue)
            except pika.exceptions.AMQPError:
                pass
        for exchange in exchanges:
            try:
                self._reopen()
                self.channel.exchange_delete(exchange)
            except pika.exceptions.AMQPError:
                pass

    def depth(self, queue: str) -> tuple[int, int]:
        """``(ready messages, consumers)`` of ``queue`` (a passive declare)."""
        ok = self.channel.queue_declare(queue, passive=True)
        return ok.method.message_count, ok.method.consumer_count

    def depth_if_exists(self, queue: str) -> int | None:
        """Ready messages in ``queue``, or None when it does not exist."""
        try:
            self._reopen()
            return self.depth(queue)[0]
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            self._reopen()
            return None

    def prefill(self, names: Names, count: int) -> float:
        """Publish ``count`` bodies to the input stream; wait until the queue holds them all."""
        started = time.monotonic()
        publish = self.channel.basic_publish
        exchange = names.input_exchange
        bodies = [body(i) for i in range(26)]
        for i in range(count):
            publish(exchange, "", bodies[i % 26], PERSISTENT)
        deadline = time.monotonic() + 60 + count / 5000
        while self.depth(names.queue)[0] < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefill: {names.queue} never reached {count} messages")
            time.sleep(0.05)
        return time.monotonic() - started

    def wait_consumer(self, queue: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.depth(queue)[1] > 0:
                return True
            time.sleep(0.02)
        return False


# -- CPU time from /proc ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) is parenthesised and may contain spaces.
    return text[text.rindex(")") + 2 :].split()


def own_and_reaped_ticks(pid: int) -> int:
    """utime+stime of ``pid`` plus cutime+cstime (its children that it has waited for)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    # After comm: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    return sum(int(fields[i]) for i in (11, 12, 13, 14))


def own_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    return 0 if fields is None else int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def tree_ticks(pid: int) -> int:
    """CPU ticks of ``pid``, its reaped children, and its live descendants (recursively)."""
    total = own_and_reaped_ticks(pid)
    for child in children(pid):
        total += tree_ticks(child)
    return total


def find_broker_pid() -> int | None:
    """The RabbitMQ node: the ``beam.smp`` whose command line boots ``rabbit``."""
    best: tuple[int, int] | None = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "beam.smp":
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rabbit" in argv and b"boot" in argv:
            pid = int(entry.name)
            ticks = own_ticks(pid)
            if best is None or ticks > best[1]:
                best = (pid, ticks)
    return None if best is None else best[0]


def machine_busy_ticks() -> int:
    """Busy ticks of all CPUs together (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))


@dataclass(frozen=True)
class CpuMark:
    """A moment, with the CPU ticks of the process under test, the broker and the machine."""

    at: float
    relay: int
    broker: int
    harness: int
    machine: int


class CpuMeter:
    def __init__(self, broker_pid: int | None) -> None:
        self.broker_pid = broker_pid

    def mark(self, relay_pid: int | None, helper_pids: tuple[int, ...] = ()) -> CpuMark:
        """Now, with CPU ticks so far; ``helper_pids`` (the latency publisher) count as harness."""
        return CpuMark(
            at=time.monotonic(),
            relay=tree_ticks(relay_pid) if relay_pid else 0,
            broker=own_ticks(self.broker_pid) if self.broker_pid else 0,
            harness=sum(own_ticks(pid) for pid in (os.getpid(), *helper_pids)),
            machine=machine_busy_ticks(),
        )

    @staticmethod
    def cores(start: CpuMark, end: CpuMark) -> tuple[float, float]:
        """``(relay cores, broker cores)`` used between two marks."""
        elapsed = max(end.at - start.at, 1e-9)
        return ((end.relay - start.relay) / CLOCK_TICKS / elapsed,
                (end.broker - start.broker) / CLOCK_TICKS / elapsed)

    @staticmethod
    def harness_cores(start: CpuMark, end: CpuMark) -> float:
        """Cores used by the harness: polling, the latency consumer and publisher."""
        return (end.harness - start.harness) / CLOCK_TICKS / max(end.at - start.at, 1e-9)

    @staticmethod
    def other_cores(start: CpuMark, end: CpuMark) -> float:
        """Cores used by everything else: other work on the machine, kernel threads."""
        elapsed = max(end.at - start.at, 1e-9)
        rest = (end.machine - start.machine) - (end.relay - start.relay) \
            - (end.broker - start.broker) - (end.harness - start.harness)
        return max(rest, 0) / CLOCK_TICKS / elapsed

    def settle(self, timeout: float, broker_max: float = 0.15,
               machine_max: float = 0.4) -> tuple[bool, float]:
        """Wait until the broker and the whole machine are nearly idle.

        Returns ``(settled, seconds waited)``: after a prefill the broker is still
        writing for a while, and other work on a shared machine comes and goes.
        Gives up after ``timeout`` seconds (the figure is then flagged by 'other').
        """
        started = time.monotonic()
        before = self.mark(None)
        while True:
            time.sleep(0.3)
            after = self.mark(None)
            elapsed = max(after.at - before.at, 1e-9)
            broker = (after.broker - before.broker) / CLOCK_TICKS / elapsed
            machine = (after.machine - before.machine) / CLOCK_TICKS / elapsed
            waited = time.monotonic() - started
            if broker < broker_max and machine < machine_max:
                return True, waited
            if waited > timeout:
                return False, waited
            before = after
