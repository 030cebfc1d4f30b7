"""The faults of a chaos run: when each one comes, and how it is done.

Kinds, each done the way it happens to a person running streamboss:

``kill``     SIGKILL to one stream agent of an operation (as the OOM killer does).
``close``    every broker connection of one agent closed through the management
             API (``DELETE /api/connections/{name}``), as an operator or a network
             blip does; the agent is found by its command line, its connections by
             their client ports.
``manager``  the manager restarted: SIGTERM (it drains its agents) and SIGKILL (its
             agents outlive it and the next manager drains them), alternately.
``broker``   ``rabbitmqctl stop_app`` then ``start_app``; the harness waits for AMQP
             and the management API, but restarts nothing of streamboss: the manager
             and the agents must reconnect by themselves.
``poison``   one message whose body makes the third operation's program SIGKILL its
             agent, every time it runs.

The faults are spread over the run by progress: each has a point in (0, 1) and
comes once that fraction of the messages has come out of the chain, and outputs
have flowed since the previous fault (so that each fault hits a recovered,
loaded chain, not the tail of the previous one) -- or, so that a stalled chain
still gets all its faults, once ``gap`` seconds have passed since the previous one.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass

from .broker import Admin, BrokerError, restart_broker
from .chain import Chain, Manager, ManagerError, agent_pids, broker_ports

KINDS = ("kill", "close", "manager", "broker", "poison")
# Faults fall between these fractions of the messages delivered: not before the
# chain has warmed up, and not so late that the last fault has nothing to hit.
FIRST_AT = 0.08
LAST_AT = 0.85
POISON_AT = 0.30
# How long a fault waits for its target to exist (an agent being restarted).
TARGET_TIMEOUT = 30.0


@dataclass
class Fault:
    """One planned fault and, once done, what happened."""

    kind: str
    at: float
    # The operation for kill and close; the signal's name for a manager restart.
    target: str = ""
    started: float | None = None
    done: float | None = None
    ok: bool = False
    detail: str = ""
    # The stream whose next message says that the chain flows again.
    watch: str = ""
    recovery: float | None = None


def plan(chain: Chain, kills: int, closes: int, manager_restarts: int, broker_restarts: int,
         poison: bool) -> list[Fault]:
    """The run's faults in the order they come, each kind spread evenly over the run.

    Kills and closes go round the three operations (a close starts one operation
    further on, so that with few faults they still hit different operations);
    manager restarts alternate SIGTERM and SIGKILL, starting with SIGTERM.
    """
    ops = chain.operations

    def spread(count: int) -> list[float]:
        return [FIRST_AT + (LAST_AT - FIRST_AT) * (i + 0.5) / count for i in range(count)]

    faults = [Fault("kill", at, ops[i % len(ops)]) for i, at in enumerate(spread(kills))]
    faults += [Fault("close", at, ops[(i + 1) % len(ops)])
               for i, at in enumerate(spread(closes))]
    faults += [Fault("manager", at, "SIGTERM" if i % 2 == 0 else "SIGKILL")
               for i, at in enumerate(spread(manager_restarts))]
    faults += [Fault("broker", at) for at in spread(broker_restarts)]
    if poison:
        faults.append(Fault("poison", POISON_AT))
    for fault in faults:
        fault.watch = chain.output_of(fault.target) if fault.target in ops else chain.tail
    return sorted(faults, key=lambda f: (f.at, KINDS.index(f.kind)))


class Injector:
    """Does the faults to one run's chain, manager and broker."""

    def __init__(self, chain: Chain, manager: Manager, admin: Admin, seed: int | None) -> None:
        self.chain = chain
        self.manager = manager
        self.admin = admin
        self.random = random.Random(seed)

    def inject(self, fault: Fault) -> None:
        """Do ``fault``, filling in its times, outcome and a line saying what was done.

        A fault that cannot be done (no agent appeared, the management API refused)
        is recorded as not done rather than raised: the run goes on and the report
        says so.
        """
        fault.started = time.time()
        try:
            fault.detail = getattr(self, f"_{fault.kind}")(fault)
            fault.ok = True
        except (BrokerError, ManagerError, OSError, TimeoutError) as exc:
            fault.detail = f"not done: {exc}"
        except Exception as exc:  # any failure of one fault is reported, not raised
            fault.detail = f"not done: {type(exc).__name__}: {exc}"
        fault.done = time.time()

    def _agents(self, operation: str) -> list[int]:
        deadline = time.monotonic() + TARGET_TIMEOUT
        while True:
            pids = agent_pids([operation])[operation]
            if pids:
                return pids
            if time.monotonic() > deadline:
                raise TimeoutError(f"no running agent of {self.chain.short(operation)} within "
                                   f"{TARGET_TIMEOUT:.0f} s")
            time.sleep(0.2)

    def _kill(self, fault: Fault) -> str:
        pids = self._agents(fault.target)
        pid = self.random.choice(pids)
        os.kill(pid, signal.SIGKILL)
        return f"kill -9 agent {pid} of {self.chain.short(fault.target)} ({len(pids)} running)"

    def _close(self, fault: Fault) -> str:
        deadline = time.monotonic() + TARGET_TIMEOUT
        while time.monotonic() < deadline:
            pids = self._agents(fault.target)
            self.random.shuffle(pids)
            for pid in pids:
                names = [name for port in sorted(broker_ports(pid, self.admin.port))
                         if (name := self.admin.connection_for_port(port)) is not None]
                closed = [name for name in names if self.admin.close_connection(name)]
                if closed:
                    return (f"closed {len(closed)} connection(s) of agent {pid} of "
                            f"{self.chain.short(fault.target)} ({', '.join(closed)})")
            # Between a reconnect and the management API listing it: look again.
            time.sleep(0.3)
        raise TimeoutError(f"no connection of an agent of {self.chain.short(fault.target)} "
                           f"to close within {TARGET_TIMEOUT:.0f} s")

    def _manager(self, fault: Fault) -> str:
        sig = signal.Signals[fault.target]
        began = time.monotonic()
        code = self.manager.stop(sig)
        stopped = time.monotonic() - began
        self.manager.start()
        self.manager.wait_ready()
        return (f"manager restart: {sig.name} (exit {code} after {stopped:.1f} s), "
                f"new manager answering {time.monotonic() - began:.1f} s after the signal")

    def _broker(self, _fault: Fault) -> str:
        away = restart_broker(self.admin)
        return (f"broker restart: rabbitmqctl stop_app, start_app; AMQP and management API "
                f"back {away:.1f} s after stop_app")

    def _poison(self, _fault: Fault) -> str:
        confirmed, error = self.admin.publish(self.chain.head, [self.chain.poison_body()])
        if not confirmed:
            raise BrokerError(f"the poison message was not confirmed: {error}")
        return f"published the poison message ({self.chain.poison_body().decode()!r})"
