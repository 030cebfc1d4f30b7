"""The ``local`` dispatcher: stream agents and archivers as child processes of the manager.

Each agent gets its operation from a definition file in the state directory
and the broker URL through its environment (never argv). Scale-in sends
SIGTERM so the agent drains its in-flight window; a crashed agent is replaced
with backoff. Agents outlive a manager that is killed: their pid files let the
next manager stop them cleanly before it starts its own set, so there are
never two sets.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamboss.agent.config import BROKER_URL_ENV, OBJECT_ALLOW_ENV, OBJECT_STORE_ENV

from .client import TOKEN_ENV
from .model import Archive, Definition, Operation
from .paths import objects_dir
from .private_files import open_private, private_dir, write_private

log = logging.getLogger(__name__)

# A crashing agent is restarted after 1 s, then 2, 4 ... up to a minute.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
# How long the manager waits for agents of a previous run to drain on start-up.
ADOPT_DRAIN_TIMEOUT = 40.0
# Pools of archivers are named so no operation name can collide ('@' is not
# allowed in names); the name also prefixes their pid and log files.
ARCHIVER_PREFIX = "archive@"
# What a process of ours has in its command line (pids are reused).
OUR_MODULES = (b"streamboss.agent", b"streamboss.manager.archiver")


# A self-hosted broker has a user per role (ansible/roles/rabbitmq): the agents and
# archivers this manager starts use their own when these are set (else the manager's
# URL), and no child is handed another's.
AGENT_BROKER_URL_ENV = "STREAMBOSS_AGENT_BROKER_URL"
ARCHIVER_BROKER_URL_ENV = "STREAMBOSS_ARCHIVER_BROKER_URL"


def archiver_pool(stream: str) -> str:
    """The pool (and pid/log file) name of ``stream``'s archiver."""
    return ARCHIVER_PREFIX + stream


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    pid_file: Path
    draining: bool = False


@dataclass
class Pool:
    """The agents of one operation."""

    agents: list[AgentProcess] = field(default_factory=list)
    restart_delay: float = RESTART_DELAY
    not_before: float = 0.0
    failures: int = 0

    @property
    def running(self) -> int:
        return sum(1 for a in self.agents if not a.draining)

    @property
    def draining(self) -> int:
        return sum(1 for a in self.agents if a.draining)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _is_ours(pid: int) -> bool:
    """Whether ``pid`` is still a streamboss agent or archiver (pids are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(module in cmdline for module in OUR_MODULES)


class LocalDispatcher:
    """Starts, scales and supervises agents on this machine.

    Parameters:
        state_dir: where definition and pid files live (``agents/``).
        broker_url: handed to agents through their environment.
    """

    def __init__(self, state_dir: Path, broker_url: str, log_dir: Path | None = None) -> None:
        # Definition files hold env values and logs hold whatever a program writes
        # to stderr: all of it 0600 in 0700 directories.
        private_dir(state_dir)
        self.dir = private_dir(state_dir / "agents")
        self.log_dir = private_dir(log_dir or (state_dir / "logs"))
        self.broker_url = broker_url
        self.pools: dict[str, Pool] = {}
        self._sequence = 0

    # -- start-up ----------------------------------------------------------------

    def replace_previous(self) -> int:
        """SIGTERM agents a previous manager left running and wait for them to drain.

        Returns:
            how many were found.
        """
        found: list[int] = []
        for pid_file in sorted(self.dir.glob("*.pid")):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                pid_file.unlink(missing_ok=True)
                continue
            if _alive(pid) and _is_ours(pid):
                os.kill(pid, signal.SIGTERM)
                found.append(pid)
            else:
                pid_file.unlink(missing_ok=True)
        deadline = time.monotonic() + ADOPT_DRAIN_TIMEOUT
        while found and time.monotonic() < deadline:
            found = [pid for pid in found if _alive(pid)]
            time.sleep(0.1)
        for pid in found:
            log.warning("agent %d from a previous run did not drain in time; killing it", pid)
            os.kill(pid, signal.SIGKILL)
        for pid_file in self.dir.glob("*.pid"):
            pid_file.unlink(missing_ok=True)
        return len(found)

    # -- scaling -------------------------------------------------------------------

    def running(self, operation: str) -> int:
        pool = self.pools.get(operation)
        return pool.running if pool else 0

    def status(self, operation: str) -> dict[str, int]:
        pool = self.pools.get(operation)
        if pool is None:
            return {"running": 0, "draining": 0, "restarts": 0}
        return {"running": pool.running, "draining": pool.draining, "restarts": pool.failures}

    def scale(self, operation: Operation, definition: Definition, count: int) -> None:
        """Bring ``operation`` to ``count`` running agents (draining ones not counted)."""
        def argv() -> list[str]:
            definition_file = self._write_definition(operation, definition)
            return ["-m", "streamboss.agent", "--operation", operation.name,
                    "--input", operation.input, "--output", operation.output,
                    "--definition", str(definition_file)]

        self._resize(operation.name, count, argv)

    def run_archiver(self, archive: Archive, run: bool) -> None:
        """Keep one archiver for ``archive`` running, or drain and stop it."""
        def argv() -> list[str]:
            return ["-m", "streamboss.manager.archiver", "--stream", archive.stream,
                    "--store", archive.store, "--segment-bytes", str(archive.segment_bytes),
                    "--segment-seconds", repr(archive.segment_seconds)]

        self._resize(archiver_pool(archive.stream), 1 if run else 0, argv)

    def _resize(self, name: str, count: int, argv: Callable[[], list[str]]) -> None:
        self.reap()
        pool = self.pools.setdefault(name, Pool())
        while pool.running > count:
            # Newest first: the oldest agents have the warmest caches and connections.
            victim = next(a for a in reversed(pool.agents) if not a.draining)
            victim.draining = True
            log.info("%s: scaling in; process %d drains and exits", name, victim.process.pid)
            victim.process.send_signal(signal.SIGTERM)
        if pool.running < count and time.monotonic() >= pool.not_before:
            args = argv()
            while pool.running < count:
                pool.agents.append(self._spawn(name, args))

    def stop_all(self, timeout: float = 40.0) -> None:
        """SIGTERM every agent and wait for them to drain (the manager is stopping)."""
        for pool in self.pools.values():
            for agent in pool.agents:
                if agent.process.poll() is None:
                    agent.draining = True
                    agent.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pool in self.pools.values():
            for agent in pool.agents:
                try:
                    agent.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    agent.process.kill()
                    agent.process.wait()
                agent.pid_file.unlink(missing_ok=True)
        self.pools.clear()

    def forget(self, operation: str) -> None:
        """The operation was deleted: drain and stop its agents."""
        # Running agents read it at start-up; nothing needs it any more.
        (self.dir / f"{operation}.definition.json").unlink(missing_ok=True)
        pool = self.pools.get(operation)
        if pool is None:
            return
        for agent in pool.agents:
            if not agent.draining:
                agent.draining = True
                agent.process.send_signal(signal.SIGTERM)

    def report(self, statuses: Mapping[str, Any]) -> None:
        """Nothing to do: local agents are scaled by :meth:`scale` alone."""

    def reap(self) -> None:
        """Collect exited agents; a crash (not a drain) delays the next start with backoff."""
        now = time.monotonic()
        for name, pool in list(self.pools.items()):
            for agent in list(pool.agents):
                code = agent.process.poll()
                if code is None:
                    continue
                pool.agents.remove(agent)
                agent.pid_file.unlink(missing_ok=True)
                if agent.draining and code == 0:
                    continue
                pool.failures += 1
                pool.not_before = now + pool.restart_delay
                log.warning("%s: agent %d exited with %d; restarting in %.0fs", name,
                            agent.process.pid, code, pool.restart_delay)
                pool.restart_delay = min(pool.restart_delay * 2, RESTART_DELAY_MAX)
            if not pool.agents and pool.not_before <= now:
                pool.restart_delay = RESTART_DELAY

    # -- processes -------------------------------------------------------------------

    def _write_definition(self, operation: Operation, definition: Definition) -> Path:
        # The stored body, real env values and all (API views mask them).
        return write_private(self.dir / f"{operation.name}.definition.json",
                             json.dumps({"definition": definition.body}, indent=2))

    def _spawn(self, name: str, args: list[str]) -> AgentProcess:
        self._sequence += 1
        env = dict(os.environ)
        # An agent needs the broker, not the manager's API token, nor the other roles'
        # broker users.
        env.pop(TOKEN_ENV, None)
        for variable in (AGENT_BROKER_URL_ENV, ARCHIVER_BROKER_URL_ENV):
            env.pop(variable, None)
        own = ARCHIVER_BROKER_URL_ENV if name.startswith(ARCHIVER_PREFIX) \
            else AGENT_BROKER_URL_ENV
        env[BROKER_URL_ENV] = os.environ.get(own) or self.broker_url
        # Large outputs go where `streamboss up` keeps objects, unless told otherwise.
        env.setdefault(OBJECT_STORE_ENV, f"file://{objects_dir(self.dir.parent)}")
        # Agents read object references only inside their store and these prefixes:
        # an operator admits another (the bucket `stream-file --store s3://...` uploads
        # to) in the manager's environment. Passed by name, so it survives any
        # narrowing of what agents inherit.
        if os.environ.get(OBJECT_ALLOW_ENV):
            env[OBJECT_ALLOW_ENV] = os.environ[OBJECT_ALLOW_ENV]
        log_file = self.log_dir / f"{name}.log"
        with os.fdopen(open_private(log_file), "ab") as log_handle:
            process = subprocess.Popen([sys.executable, *args], env=env,
                                       stdin=subprocess.DEVNULL, stdout=log_handle,
                                       stderr=log_handle, start_new_session=True)
        pid_file = write_private(self.dir / f"{name}.{process.pid}.pid", f"{process.pid}\n")
        log.info("%s: started process %d", name, process.pid)
        return AgentProcess(process, pid_file)
