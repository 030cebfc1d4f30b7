"""The declarations the manager keeps: streams, process definitions, operations, archives."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Phantom-style policy defaults for the local dispatcher: scale to zero when
# nobody listens, at most a few agents on one machine.
DEFAULT_MIN = 0
DEFAULT_MAX = 4
# One agent per 1,000 waiting messages: an agent relays several thousand a
# second, so a backlog this size clears within a second or two per agent.
DEFAULT_TARGET_BACKLOG = 1000
DEFAULT_SCALE_OUT_COOLDOWN = 5.0
DEFAULT_SCALE_IN_COOLDOWN = 30.0
DEFAULT_IDLE_SECONDS = 60.0
# No warm pool: an operation's agents boot from scratch when it wakes (AWS only).
DEFAULT_WARM_POOL = 0


@dataclass(frozen=True)
class ScalingPolicy:
    """How many agents an operation may have and how fast that number moves."""

    min: int = DEFAULT_MIN
    max: int = DEFAULT_MAX
    target_backlog_per_agent: int = DEFAULT_TARGET_BACKLOG
    scale_out_cooldown: float = DEFAULT_SCALE_OUT_COOLDOWN
    scale_in_cooldown: float = DEFAULT_SCALE_IN_COOLDOWN
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    # On AWS: stopped instances kept ready in the pool's warm pool, so waking
    # starts a stopped instance instead of booting a new one. The local
    # dispatcher has nothing to keep warm and ignores it.
    warm_pool: int = DEFAULT_WARM_POOL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Stream:
    name: str
    created_at: str


# What every view outside the manager shows for a definition's env value: the
# names say what a program is given, the values are secrets (passwords, keys).
MASKED = "<secret>"


def masked_body(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with each ``env`` value replaced by :data:`MASKED` (names kept)."""
    env = body.get("env")
    if not isinstance(env, dict):
        return dict(body)
    return {**body, "env": {name: MASKED for name in env}}


@dataclass(frozen=True)
class Definition:
    """A process definition: ``body`` is the agent's definition object (exec, mode, ...).

    ``body`` holds the real ``env`` values, for the dispatchers that hand them to
    agents; :meth:`to_dict`, the view the API and CLI show, masks them.
    """

    id: int
    name: str
    version: int
    body: dict[str, Any] = field(repr=False)
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """The public view: everything but the ``env`` values."""
        return {"id": self.id, "name": self.name, "version": self.version,
                "definition": masked_body(self.body), "created_at": self.created_at}


@dataclass(frozen=True)
class Operation:
    name: str
    definition_id: int
    input: str
    output: str
    policy: ScalingPolicy = field(default_factory=ScalingPolicy)
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "definition_id": self.definition_id, "input": self.input,
                "output": self.output, "policy": self.policy.to_dict(),
                "created_at": self.created_at}


# A segment is rolled at whichever comes first. 64 MiB keeps object counts low
# and uploads efficient; a minute bounds what a replay can miss of the recent past.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_SECONDS = 60.0


@dataclass(frozen=True)
class Archive:
    """A stream's archive: where its segments go and how they are rolled.

    A stopped archive keeps its row, so its segments can still be replayed.
    """

    stream: str
    store: str
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS
    active: bool = True
    created_at: str = ""
    stopped_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
