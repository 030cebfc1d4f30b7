"""What an agent runs: the process definition and the operation around it.

Everything is validated here, before the agent touches the broker, so a bad
declaration fails with one line that names the field and the fix.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .framing import FRAMINGS
from .naming import MAX_ATTEMPTS_LIMIT, InvalidName, check_name
from .object_refs import ObjectStores, parse_allow
from .retry import DEFAULT_RETRY_DELAY, RETRY_DELAY_MAX

BROKER_URL_ENV = "STREAMBOSS_BROKER_URL"
OBJECT_STORE_ENV = "STREAMBOSS_OBJECT_STORE"
# More places object references may point into, beside the object store: comma-separated
# URL prefixes (file:///dir, s3://bucket[/prefix]).
OBJECT_ALLOW_ENV = "STREAMBOSS_OBJECT_ALLOW"
# Outputs above this go to the object store as references: far below RabbitMQ's
# 128 MiB message limit, and large messages slow every queue they pass through.
DEFAULT_OUTPUT_THRESHOLD = 4 * 1024 * 1024
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# RabbitMQ's default max_message_size (128 MiB). A broker set lower is learned
# from its first refusal; setting it here avoids that one reconnect.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024
MODES = ("per-message", "service")

# Retrying three times tells a flaky program from a broken one without
# holding a poison message for long.
DEFAULT_MAX_ATTEMPTS = 3
# A transform that takes a minute per record is stuck, not slow.
DEFAULT_TIMEOUT = 60.0
# 200 records in flight keep a pipelined service child and the broker busy
# (BASELINES.md: the safe relay gains little beyond this on 2 cores).
DEFAULT_SERVICE_PREFETCH = 200
# Each ack waits for the output's confirm (a disk sync on the broker); a
# window of a few messages per child keeps the children busy meanwhile.
PER_MESSAGE_MIN_PREFETCH = 16
# Finishing the in-flight window on SIGTERM should take seconds; past this the
# rest is handed back to the broker.
DEFAULT_DRAIN_TIMEOUT = 30.0


class ConfigError(ValueError):
    """A declaration the agent cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class ProcessDefinition:
    """A named recipe for a transform (the seed's ``definition`` object, extended)."""

    exec: str | list[str]
    name: str | None = None
    application: str | None = None
    mode: str = "per-message"
    framing: str = "line"
    output_framing: str | None = None
    timeout: float | None = DEFAULT_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_delay: float = DEFAULT_RETRY_DELAY
    env: dict[str, str] = field(default_factory=dict)
    shell: bool = False
    concurrency: int | None = None
    image: str | None = None

    @property
    def argv(self) -> list[str]:
        """The program and its arguments, split with shlex unless ``shell`` is set."""
        if isinstance(self.exec, list):
            return list(self.exec)
        if self.shell:
            return ["/bin/sh", "-c", self.exec]
        return shlex.split(self.exec)

    @property
    def out_framing(self) -> str:
        return self.output_framing or self.framing


_DEFINITION_FIELDS = {
    "exec", "name", "application", "mode", "framing", "output_framing", "timeout",
    "max_attempts", "retry_delay", "env", "shell", "concurrency", "image",
}


def _number(where: str, value: Any, *, integer: bool, minimum: float,
            maximum: float | None = None) -> Any:
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be {kind}, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{where} must be {kind}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where} must be at least {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where} must be at most {maximum:g}, got {value!r}")
    return value


def parse_definition(data: Any) -> ProcessDefinition:
    """Build a definition from the seed's JSON or our fuller form.

    Accepts ``{"definition": {...}}`` (the seed) or the inner object itself.
    Hyphens and underscores are interchangeable in field names.

    Raises:
        ConfigError: a missing ``exec``, an unknown field, mode or framing, a bad number.
    """
    if isinstance(data, dict) and isinstance(data.get("definition"), dict):
        data = data["definition"]
    if not isinstance(data, dict):
        raise ConfigError("process definition must be a JSON object with at least 'exec'")
    fields = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(fields) - _DEFINITION_FIELDS)
    if unknown:
        raise ConfigError(
            f"process definition has unknown field(s) {', '.join(unknown)}: "
            f"allowed are {', '.join(sorted(_DEFINITION_FIELDS))}"
        )
    command = fields.get("exec")
    if isinstance(command, list):
        if not command or not all(isinstance(a, str) for a in command):
            raise ConfigError("process definition 'exec' list must hold strings, program first")
    elif command is not None and not isinstance(command, str):
        raise ConfigError(f"process definition 'exec' must be a command line or a list of "
                          f"strings, not {type(command).__name__}")
    elif command is None or not command.strip():
        raise ConfigError("process definition is missing 'exec': give the command to run")
    mode = fields.get("mode", "per-message")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    for key in ("framing", "output_framing"):
        value = fields.get(key)
        if value is not None and value not in FRAMINGS:
            raise ConfigError(f"unknown {key} {value!r}: use one of {', '.join(FRAMINGS)}")
    timeout = fields.get("timeout", DEFAULT_TIMEOUT)
    if timeout is not None:
        timeout = float(_number("timeout", timeout, integer=False, minimum=0.001))
    max_attempts = _number(
        "max_attempts", fields.get("max_attempts", DEFAULT_MAX_ATTEMPTS), integer=True,
        minimum=1, maximum=MAX_ATTEMPTS_LIMIT)
    retry_delay = float(_number("retry_delay", fields.get("retry_delay", DEFAULT_RETRY_DELAY),
                                integer=False, minimum=0.001, maximum=RETRY_DELAY_MAX))
    concurrency = fields.get("concurrency")
    if concurrency is not None:
        concurrency = _number("concurrency", concurrency, integer=True, minimum=1)
    env = fields.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
        raise ConfigError("process definition 'env' must map names to values")
    for key, value in env.items():
        # exec cannot carry these: the program could never start.
        if not key or "=" in key or "\0" in key or "\0" in str(value):
            raise ConfigError(f"process definition 'env' entry {key!r} cannot be passed to a "
                              "program: names need no '=' and neither may hold a NUL byte")
    definition = ProcessDefinition(
        exec=command,
        name=fields.get("name"),
        application=fields.get("application"),
        mode=mode,
        framing=fields.get("framing") or "line",
        output_framing=fields.get("output_framing"),
        timeout=timeout,
        max_attempts=max_attempts,
        retry_delay=retry_delay,
        env={k: str(v) for k, v in env.items()},
        shell=bool(fields.get("shell", False)),
        concurrency=concurrency,
        image=fields.get("image"),
    )
    try:
        argv = definition.argv
    except ValueError as exc:
        raise ConfigError(f"process definition 'exec' cannot be split: {exc}") from None
    if not argv:
        raise ConfigError("process definition is missing 'exec': give the command to run")
    return definition


@dataclass(frozen=True)
class AgentConfig:
    """One operation as an agent runs it."""

    operation: str
    input: str
    output: str
    definition: ProcessDefinition
    broker_url: str = DEFAULT_BROKER_URL
    prefetch: int = 0
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    object_store: str | None = None
    # Prefixes beside object_store that object references may point into.
    object_allow: tuple[str, ...] = ()
    output_threshold: int = DEFAULT_OUTPUT_THRESHOLD
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE

    @property
    def concurrency(self) -> int:
        """How many per-message children may run at once."""
        # Children spend much of their short lives in exec and page faults, not
        # on a CPU: two per core keep the cores busy (tools/bench: c=4 on 2 cores
        # relays ~20 % more than c=2).
        return self.definition.concurrency or 2 * max(1, os.cpu_count() or 1)

    @property
    def window(self) -> int:
        """Unacked messages the broker may hand this agent (the prefetch)."""
        if self.prefetch:
            return self.prefetch
        if self.definition.mode == "service":
            return DEFAULT_SERVICE_PREFETCH
        return max(PER_MESSAGE_MIN_PREFETCH, 4 * self.concurrency)


def read_file(path: Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON file into a dict.

    Raises:
        ConfigError: the file is missing, unreadable or malformed.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object at the top level")
    return data


def broker_url(file_value: str | None) -> str:
    """The broker URL: ``STREAMBOSS_BROKER_URL``, else the config file, else the local default."""
    return os.environ.get(BROKER_URL_ENV) or file_value or DEFAULT_BROKER_URL


def redact(url: str) -> str:
    """``url`` with any password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def build_config(
    operation: str | None,
    input_stream: str | None,
    output_stream: str | None,
    definition: dict[str, Any],
    file_values: dict[str, Any],
    prefetch: int | None = None,
    drain_timeout: float | None = None,
    output_threshold: int | None = None,
    max_message_size: int | None = None,
) -> AgentConfig:
    """Merge command-line values over a config file's and validate the result.

    Raises:
        ConfigError: a missing or invalid name, definition or number.
    """
    op_section = file_values.get("operation") or {}
    if not isinstance(op_section, dict):
        raise ConfigError("config file 'operation' must be a table/object")
    file_definition = file_values.get("definition") or {}
    if isinstance(file_definition, dict) and isinstance(file_definition.get("definition"), dict):
        file_definition = file_definition["definition"]
    merged = {str(k).replace("-", "_"): v for k, v in dict(file_definition).items()}
    merged.update({k: v for k, v in definition.items() if v is not None})
    parsed = parse_definition(merged)
    op = operation or op_section.get("name")
    source = input_stream or op_section.get("input")
    sink = output_stream or op_section.get("output")
    missing = [flag for flag, value in (("--operation", op), ("--input", source),
                                        ("--output", sink)) if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: name the operation and its two streams")
    try:
        check_name("operation", op)
        check_name("input stream", source)
        check_name("output stream", sink)
    except InvalidName as exc:
        raise ConfigError(str(exc)) from None
    window = prefetch if prefetch is not None else op_section.get("prefetch", 0)
    drain = drain_timeout if drain_timeout is not None else op_section.get(
        "drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    object_store = os.environ.get(OBJECT_STORE_ENV) or file_values.get("object_store")
    allow_value = os.environ.get(OBJECT_ALLOW_ENV) or file_values.get("object_allow")
    if allow_value is not None and not isinstance(allow_value, str | list):
        raise ConfigError("object_allow must be a list of URL prefixes (or one "
                          "comma-separated string)")
    object_allow = parse_allow(allow_value)
    try:
        ObjectStores.configured(object_store, object_allow)
    except ValueError as exc:
        raise ConfigError(f"{exc} (from {OBJECT_STORE_ENV}, {OBJECT_ALLOW_ENV} or the config "
                          "file)") from None
    return AgentConfig(
        operation=op,
        input=source,
        output=sink,
        definition=parsed,
        broker_url=broker_url(file_values.get("broker_url")),
        prefetch=_number("prefetch", window, integer=True, minimum=0),
        drain_timeout=float(_number("drain_timeout", drain, integer=False, minimum=0)),
        object_store=object_store,
        object_allow=object_allow,
        output_threshold=_number(
            "output_threshold", output_threshold or op_section.get(
                "output_threshold", DEFAULT_OUTPUT_THRESHOLD),
            integer=True, minimum=1),
        max_message_size=_number(
            "max_message_size", max_message_size or op_section.get(
                "max_message_size", file_values.get("max_message_size",
                                                    DEFAULT_MAX_MESSAGE_SIZE)),
            integer=True, minimum=1),
    )


# -- the broker's consumer timeout ---------------------------------------------------
# RabbitMQ closes the channel of a consumer that holds one delivery unacknowledged
# longer than its consumer_timeout (30 minutes by default, also on Amazon MQ), and
# every delivery on that channel goes back to the queue, each charged an attempt.
# RabbitMQ 3.12+ can lift it per queue (policy key `consumer-timeout`); older
# brokers cannot, so a definition that could hold a delivery longer is refused.
CONSUMER_TIMEOUT_ENV = "STREAMBOSS_BROKER_CONSUMER_TIMEOUT"
DEFAULT_CONSUMER_TIMEOUT = 1800.0


def consumer_timeout_limit(value: str | None = None) -> float:
    """The broker's consumer timeout in seconds: ``value``, else
    ``STREAMBOSS_BROKER_CONSUMER_TIMEOUT``, else RabbitMQ's default (1800).

    Raises:
        ConfigError: not a positive number of seconds.
    """
    text = value if value is not None else os.environ.get(CONSUMER_TIMEOUT_ENV)
    if text is None or not text.strip():
        return DEFAULT_CONSUMER_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{CONSUMER_TIMEOUT_ENV} must be the broker's consumer timeout in "
                          f"seconds (its consumer_timeout / 1000), got {text!r}")
    return seconds


def delivery_hold(definition: ProcessDefinition, window: int, concurrency: int,
                  ) -> float | None:
    """The longest an agent can hold one delivery unacknowledged, in seconds; None
    when unbounded (no ``timeout``).

    A failed attempt is republished (to a retry queue) and its delivery acked, so a
    delivery is held for one run, plus the runs ahead of it in the agent's window:
    per-message, ``concurrency`` children work through a window of ``window``
    deliveries, so the last waits for ceil(window / concurrency) - 1 runs. Service
    mode times each record out at the head of the line: one ``timeout``. (Records
    queued behind a slow head wait too; the window of a service is sized for fast
    records, and the check would otherwise refuse every default service.)
    """
    if definition.timeout is None:
        return None
    if definition.mode == "per-message":
        runs = -(-max(1, window) // max(1, concurrency))
        return runs * definition.timeout
    return definition.timeout


def check_consumer_timeout(definition: ProcessDefinition, limit: float,
                           window: int | None = None, concurrency: int | None = None,
                           ) -> None:
    """Refuse a definition whose agents could hold one delivery longer than the
    broker's consumer timeout ``limit`` (seconds).

    ``window`` and ``concurrency`` are the agent's (prefetch and children); by
    default those an agent on this machine would use.

    Raises:
        ConfigError: one line naming the field, the broker's limit and the fix.
    """
    if window is None or concurrency is None:
        defaults = AgentConfig("x", "x", "x", definition)
        window = defaults.window if window is None else window
        concurrency = defaults.concurrency if concurrency is None else concurrency
    hold = delivery_hold(definition, window, concurrency)
    lift = f"or raise the broker's consumer_timeout and set {CONSUMER_TIMEOUT_ENV} to it"
    if hold is None:
        raise ConfigError(
            f"process definition 'timeout' is unset (no limit), but the broker closes a "
            f"consumer holding a message over {limit:g}s (its consumer timeout): set "
            f"timeout to at most {limit:g} seconds, {lift}")
    if hold <= limit:
        return
    runs = round(hold / definition.timeout) if definition.timeout else 1
    if runs <= 1:
        raise ConfigError(
            f"process definition 'timeout' {definition.timeout:g}s is above the broker's "
            f"consumer timeout of {limit:g}s: set timeout to at most {limit:g}, {lift}")
    raise ConfigError(
        f"process definition 'timeout' {definition.timeout:g}s can hold a message "
        f"{hold:g}s ({runs} runs: a window of {window} messages for {concurrency} "
        f"children), above the broker's consumer timeout of {limit:g}s: set timeout to "
        f"at most {math.floor(limit / runs):g}, {lift}")
