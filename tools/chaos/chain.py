"""The chain under test: its names and bodies, its three programs, its manager and agents.

The chain is ``<p>-in -> cat (service) -> <p>-lines -> tr a-z A-Z (per-message) ->
<p>-upper -> flaky (per-message) -> <p>-out`` where ``<p>`` is ``chaos-<run id>``, so
a run never touches another run's (or a test's) streams, queues or processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from streamboss.manager import api_token

REPO_ROOT = Path(__file__).resolve().parents[2]

# Every body is this long: small enough that 20,000 of them are no strain on a
# laptop's broker, long enough to look like a record rather than a counter.
BODY_SIZE = 100
_FILLER = "the quick brown fox jumps over the lazy dog " * 4

# The third program fails this way (EX_TEMPFAIL) when it decides to fail.
TRANSIENT_EXIT = 75

# The per-message program of the third operation. Written as POSIX sh (dash on
# Debian) because it runs once per message: a Python start-up per message would
# make the chain, not the faults, the subject of the run. A body carrying the
# poison marker makes it SIGKILL the stream agent that started it, as the kernel's
# OOM killer would: it walks up from its parent to the first process running
# streamboss.agent, so a wrapper between agent and program changes nothing.
FLAKY_PROGRAM = r"""#!/bin/sh
# streamboss chaos run: upper-case text passes through; about CHAOS_FAIL_PERCENT of
# attempts fail (exit 75); a body holding $CHAOS_POISON kills the agent running it.
IFS= read -r body || true
case "$body" in
  *"$CHAOS_POISON"*)
    p=$PPID
    while [ "$p" -gt 1 ]; do
      if tr '\0' ' ' < "/proc/$p/cmdline" | grep -q 'streamboss[.]agent'; then
        echo "$(date +%s.%N) $p" >> "$CHAOS_POISON_LOG"
        kill -9 "$p"
        exit 137
      fi
      p=$(sed 's/.*) //' "/proc/$p/stat" | cut -d' ' -f2)
    done
    echo "chaos: no stream agent above $$ to kill" >&2
    exit 1
    ;;
esac
set -- $(od -An -N2 -tu2 /dev/urandom)
if [ "$1" -lt "$CHAOS_FAIL_BELOW" ]; then
  echo "chaos: transient failure (this attempt only)" >&2
  exit 75
fi
printf '%s' "$body"
"""

# Scaling while wanted (the chain always is: the harness's durable subscription
# holds its output): at least one agent per operation so that there is always one
# to kill, a second one under a backlog so that kills also hit busy pools.
POLICY = {"min": 1, "target_backlog_per_agent": 400, "scale_out_cooldown": 2,
          "scale_in_cooldown": 10, "idle_seconds": 30}
# A record that takes this long is stuck (the chain's records take milliseconds).
PROGRAM_TIMEOUT = 30


@dataclass(frozen=True)
class Chain:
    """Names of one run's streams, operations and harness queues, and its bodies."""

    run: str

    @property
    def prefix(self) -> str:
        return f"chaos-{self.run}"

    @property
    def streams(self) -> list[str]:
        """Head to tail: the input, the two intermediate streams, the output."""
        return [f"{self.prefix}-{s}" for s in ("in", "lines", "upper", "out")]

    @property
    def operations(self) -> list[str]:
        """In chain order: cat (service), upper (tr), flaky."""
        return [f"{self.prefix}-{o}" for o in ("cat", "upper", "flaky")]

    @property
    def head(self) -> str:
        return self.streams[0]

    @property
    def tail(self) -> str:
        return self.streams[-1]

    def output_of(self, operation: str) -> str:
        return self.streams[self.operations.index(operation) + 1]

    def short(self, operation: str) -> str:
        """``cat``, ``upper`` or ``flaky``: how the report names an operation."""
        return operation.removeprefix(self.prefix + "-")

    @property
    def output_queue(self) -> str:
        # A named durable subscription: it keeps outputs while the harness's consumer is
        # away (a broker restart) and, being ``sb.sub.*``, makes the chain wanted.
        return f"sb.sub.{self.prefix}"

    @property
    def dead_queue(self) -> str:
        # The harness's own copy of every dead letter of the chain (bound to the three
        # dead-letter streams); not ``sb.*``, so the manager gives it no meaning.
        return f"{self.prefix}.dead-letters"

    @property
    def poison_marker(self) -> str:
        """What the third program sees in the poison (after ``tr a-z A-Z``)."""
        return f"POISON-{self.run.upper()}"

    def poison_body(self) -> bytes:
        return f"poison-{self.run} this message kills the agent that runs it".encode()

    def body(self, seq: int) -> bytes:
        """The input with sequence number ``seq``: lowercase, one line, BODY_SIZE bytes."""
        head = f"chaos {self.run} {seq:07d} "
        return (head + _FILLER[: BODY_SIZE - len(head)]).encode()

    def sequence(self, output: bytes) -> int | None:
        """The sequence number of an output of the chain; None if it is not one."""
        parts = output.split(b" ", 3)
        if len(parts) < 3 or parts[0] != b"CHAOS" or parts[1] != self.run.upper().encode():
            return None
        try:
            return int(parts[2])
        except ValueError:
            return None

    def definitions(self, work_dir: Path, max_attempts: int,
                    fail_percent: float) -> list[dict[str, Any]]:
        """The three process definitions, named after their operations; writes the
        third program and its poison log into ``work_dir``."""
        program = work_dir / "flaky.sh"
        program.write_text(FLAKY_PROGRAM)
        program.chmod(0o755)
        common = {"max_attempts": max_attempts, "timeout": PROGRAM_TIMEOUT}
        cat, upper, flaky = self.operations
        return [
            {"name": cat, "exec": "cat", "mode": "service", **common},
            {"name": upper, "exec": "tr a-z A-Z", **common},
            {"name": flaky, "exec": str(program), **common, "env": {
                "CHAOS_POISON": self.poison_marker,
                "CHAOS_POISON_LOG": str(self.poison_log(work_dir)),
                "CHAOS_FAIL_BELOW": str(round(65536 * fail_percent / 100)),
                "CHAOS_FAIL_PERCENT": f"{fail_percent:g}%"}},
        ]

    @staticmethod
    def poison_log(work_dir: Path) -> Path:
        """One line per run of the program on the poison: ``<unix time> <agent pid>``."""
        return work_dir / "poison-kills.log"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ManagerError(RuntimeError):
    """The manager did not start, answer or stop; the message says which and where."""


class Manager:
    """``streamboss manager`` (local dispatcher) on a state directory of the run's own.

    It is restarted on the same port and state directory, as a person would after
    a crash or an upgrade; its log accumulates in ``<work>/manager.log``.
    """

    def __init__(self, state_dir: Path, broker_url: str, log_path: Path) -> None:
        self.state_dir = state_dir
        self.broker_url = broker_url
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=15)

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, STREAMBOSS_BROKER_URL=self.broker_url)
        env.pop("STREAMBOSS_TOKEN", None)
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamboss.manager", "manager", "--port", str(self.port),
             "--state-dir", str(self.state_dir)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env,
            cwd=REPO_ROOT)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ManagerError(f"the manager exited; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/v1/health", timeout=2).status_code == 200:
                    # The token the manager generated (it is up, so the file is there).
                    token = api_token.read(self.state_dir)
                    if token is None:
                        raise ManagerError(f"no API token in {self.state_dir}")
                    self.http.headers["Authorization"] = f"Bearer {token}"
                    return
            time.sleep(0.1)
        raise ManagerError(f"the manager did not answer within {timeout:.0f} s; "
                           f"see {self.log_path}")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise ManagerError(f"{method} {path} -> {response.status_code}: "
                               f"{response.text[:300]}")
        return response.json()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 120) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after ``timeout``); the exit code.

        SIGTERM drains the manager's agents first; SIGKILL leaves them running, for the
        next manager to drain, as after a crash.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def close(self) -> None:
        self.http.close()


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed agent stays a zombie until its manager reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def agent_pids(operations: list[str]) -> dict[str, list[int]]:
    """Running stream agents of each operation, found by their command line.

    The command line, not the manager's pid files: it works whatever the manager
    keeps, and also finds the agents a killed manager left behind.
    """
    found: dict[str, list[int]] = {op: [] for op in operations}
    wanted = {op.encode(): op for op in operations}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if b"streamboss.agent" not in argv or b"--operation" not in argv:
            continue
        position = argv.index(b"--operation") + 1
        op = wanted.get(argv[position]) if position < len(argv) else None
        if op is not None and _running(int(entry)):
            found[op].append(int(entry))
    return found


def broker_ports(pid: int, broker_port: int) -> set[int]:
    """Local TCP ports of ``pid``'s established connections to the broker."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if inode in inodes and state == "01" \
                        and int(remote.rsplit(":", 1)[1], 16) == broker_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports
