"""Stand-ins for what an agent node's lifecycle handler talks to on AWS.

- :class:`StandInMetadata`: IMDSv2 on loopback. ``PUT /latest/api/token`` needs the
  TTL header; every ``GET`` needs the token it handed out (else 401, as IMDS with
  ``http_tokens = required``). It serves ``instance-id``,
  ``autoscaling/target-lifecycle-state`` (which a test switches to ``Terminated``) and,
  when given one, the ``aws:autoscaling:groupName`` instance tag (as with tags in
  instance metadata enabled).
- :func:`lifecycle_actions_in_moto`: moto 5.2.5 has no ``CompleteLifecycleAction``
  or ``RecordLifecycleActionHeartbeat`` (both raise NotImplementedError). This adds
  them to moto's autoscaling responses for one test, checking what AWS checks (the
  group exists, it has that hook, the instance is in the group, the action is still
  waiting, the result is CONTINUE or ABANDON) and recording every call.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
GROUP_TAG = "/latest/meta-data/tags/instance/aws:autoscaling:groupName"


class StandInMetadata:
    """A loopback IMDSv2 serving one instance's id and target lifecycle state."""

    def __init__(self, instance_id: str, state: str = "InService",
                 group: str | None = None) -> None:
        self.instance_id = instance_id
        self.state = state
        self.group = group
        self.tokens: set[str] = set()
        self.token_puts = 0
        self.refused: list[str] = []  # requests without a valid token, by path
        self.gets: dict[str, int] = {}
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                if self.path != TOKEN_PATH:
                    return self._answer(404, "")
                ttl = self.headers.get(TTL_HEADER, "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._answer(400, "")
                token = secrets.token_urlsafe(24)
                with standin.lock:
                    standin.tokens.add(token)
                    standin.token_puts += 1
                self._answer(200, token)

            def do_GET(self) -> None:
                with standin.lock:
                    valid = self.headers.get(TOKEN_HEADER) in standin.tokens
                    if not valid:
                        standin.refused.append(self.path)
                    else:
                        standin.gets[self.path] = standin.gets.get(self.path, 0) + 1
                if not valid:
                    return self._answer(401, "")
                values = {"/latest/meta-data/instance-id": standin.instance_id,
                          "/latest/meta-data/autoscaling/target-lifecycle-state":
                          standin.state}
                if standin.group is not None:
                    values[GROUP_TAG] = standin.group
                if self.path not in values:
                    return self._answer(404, "")
                self._answer(200, values[self.path])

            def _answer(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def state_reads(self) -> int:
        with self.lock:
            return self.gets.get("/latest/meta-data/autoscaling/target-lifecycle-state", 0)

    def __enter__(self) -> StandInMetadata:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class LifecycleCall:
    """One lifecycle call moto received, and what the test's observer saw at that moment."""

    action: str  # "heartbeat" or "complete"
    group: str
    hook: str
    instance_id: str
    result: str | None
    observed: Any


@dataclass
class LifecycleLedger:
    """What the stand-in recorded; ``observe`` is called at every call (e.g. is the agent
    still running?)."""

    observe: Callable[[], Any] = lambda: None
    calls: list[LifecycleCall] = field(default_factory=list)
    completed: set[tuple[str, str, str]] = field(default_factory=set)

    def of(self, action: str) -> list[LifecycleCall]:
        return [c for c in self.calls if c.action == action]


@contextmanager
def lifecycle_actions_in_moto(observe: Callable[[], Any] = lambda: None
                              ) -> Iterator[LifecycleLedger]:
    """Teach moto's autoscaling the two lifecycle calls for the ``with`` block."""
    from moto.autoscaling.exceptions import ValidationError
    from moto.autoscaling.responses import AutoScalingResponse
    from moto.core.responses import EmptyResult

    ledger = LifecycleLedger(observe=observe)
    lock = threading.Lock()

    def checked(response: AutoScalingResponse, action: str) -> EmptyResult:
        group_name = response._get_param("AutoScalingGroupName")
        hook = response._get_param("LifecycleHookName")
        instance_id = response._get_param("InstanceId")
        result = response._get_param("LifecycleActionResult")
        backend = response.autoscaling_backend
        group = backend.autoscaling_groups.get(group_name)
        if group is None:
            raise ValidationError(f"Group {group_name} not found")
        if f"{group_name}_{hook}" not in backend.lifecycle_hooks:
            raise ValidationError(f"No lifecycle hook {hook} on {group_name}")
        if instance_id not in {s.instance.id for s in group.instance_states}:
            raise ValidationError(f"Instance {instance_id} is not in {group_name}")
        if action == "complete" and result not in ("CONTINUE", "ABANDON"):
            raise ValidationError(f"LifecycleActionResult {result!r} is not valid")
        key = (group_name, hook, instance_id)
        with lock:
            if key in ledger.completed:
                raise ValidationError(
                    f"No active Lifecycle Action found with instance ID {instance_id}")
            ledger.calls.append(LifecycleCall(action, group_name, hook, instance_id, result,
                                              ledger.observe()))
            if action == "complete":
                ledger.completed.add(key)
        return EmptyResult()

    def heartbeat(self: AutoScalingResponse) -> EmptyResult:
        return checked(self, "heartbeat")

    def complete(self: AutoScalingResponse) -> EmptyResult:
        return checked(self, "complete")

    saved = {name: AutoScalingResponse.__dict__.get(name) for name in
             ("record_lifecycle_action_heartbeat", "complete_lifecycle_action")}
    AutoScalingResponse.record_lifecycle_action_heartbeat = heartbeat  # type: ignore[attr-defined]
    AutoScalingResponse.complete_lifecycle_action = complete  # type: ignore[attr-defined]
    try:
        yield ledger
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(AutoScalingResponse, name)
            else:
                setattr(AutoScalingResponse, name, value)
