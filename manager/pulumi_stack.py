"""A thin driver of one Pulumi stack through the Automation API.

The AWS dispatcher hands it the stack configuration computed from the
manager's declarations (``stack_config.py``); :meth:`PulumiStack.apply` writes
it into the stack and runs a preview, then an update. The Automation API
shells out to the Pulumi CLI, so :func:`check_cli` runs before the manager
starts anything: without the CLI every update would fail later, and far from
the person who started the manager.

``streamboss:operations`` is written as its canonical JSON text (a string
config value, not YAML structure): ``pulumi config set KEY TEXT`` stores it
verbatim, and the program reads it with ``pulumi.Config.get_object``, which
parses JSON text and structured YAML alike (``infra/settings.py``). The text is
what the dispatcher compares and hashes, so what was applied is exactly known.

The operations' env values go to ``streamboss:operationsEnv`` as a Pulumi
secret (encrypted in the stack's config and state). Not through the Automation
API's ``set_config``: it passes the value as an argument of the CLI, which every
user of the machine can read in ``/proc/<pid>/cmdline``; the value goes to
``pulumi config set --secret`` on its stdin instead (:func:`write_secret_config`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .stack_config import CONFIG_KEY, ENV_CONFIG_KEY, StackConfig

# The Pulumi CLI's name on PATH; the Automation API runs it as a subprocess.
CLI = "pulumi"
CLI_MISSING = ("the Pulumi CLI is not installed (no `pulumi` on PATH): install it "
               "(https://www.pulumi.com/docs/install/) or run with --dispatcher local")
SDK_MISSING = ("the Pulumi SDK is not installed: pip install 'streamboss[aws]' "
               "or run with --dispatcher local")
# Pulumi stack references: STACK, ORG/STACK or ORG/PROJECT/STACK.
STACK_PATTERN = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,2}")
# Where Pulumi.yaml lives in a checkout: the repository root, above manager/.
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILE = "Pulumi.yaml"
# Recorded with each update in the stack's history.
UPDATE_MESSAGE = "streamboss manager: declarations changed"
# A failure's message is kept for `streamboss status`; long CLI output is cut.
ERROR_MAX_CHARS = 400
# `pulumi config set` reads and encrypts one value: seconds, not minutes.
CONFIG_SET_TIMEOUT = 120.0


class PulumiUnavailable(RuntimeError):
    """The Pulumi CLI or SDK is missing; the message is one line naming the fix."""


class StackError(RuntimeError):
    """An apply failed.

    Attributes:
        phase: ``select``, ``config``, ``preview`` or ``update``.
        summary: what was learned before the failure (e.g. the preview's changes).
    """

    def __init__(self, phase: str, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.phase = phase
        self.summary = summary


def check_stack_name(name: str) -> str:
    """Return ``name`` if it is a Pulumi stack reference.

    Raises:
        ValueError: it is not ``STACK``, ``ORG/STACK`` or ``ORG/PROJECT/STACK``.
    """
    if not STACK_PATTERN.fullmatch(name):
        raise ValueError(f"--stack {name!r} is not a Pulumi stack: use ORG/PROJECT/STACK "
                         "(e.g. acme/streamboss/dev)")
    return name


def default_project_dir() -> Path:
    """The checkout's root when running from one (where Pulumi.yaml is), else the cwd."""
    return CHECKOUT_ROOT if (CHECKOUT_ROOT / PROJECT_FILE).is_file() else Path.cwd()


def check_cli(which: Callable[[str], str | None] = shutil.which) -> str:
    """The path of the Pulumi CLI.

    Raises:
        PulumiUnavailable: ``pulumi`` is not on PATH.
    """
    path = which(CLI)
    if path is None:
        raise PulumiUnavailable(CLI_MISSING)
    return path


def load_automation() -> ModuleType:
    """``pulumi.automation``, imported on demand (the SDK is an optional extra).

    Raises:
        PulumiUnavailable: the SDK is not installed.
    """
    try:
        import pulumi.automation as automation
    except ImportError:
        raise PulumiUnavailable(SDK_MISSING) from None
    return automation


def one_line(exc: BaseException) -> str:
    """A short, single-line account of an Automation API error.

    A ``CommandError``'s text is the CLI's whole stdout and stderr; Pulumi's own
    diagnosis is its ``error:`` line, else the last line of stderr.
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        line = errors[-1]
    else:
        _, _, stderr = text.partition(" stderr:")
        tail = [line.strip() for line in stderr.splitlines() if line.strip()]
        line = tail[-1] if tail else (lines[0] if lines else type(exc).__name__)
    return line[:ERROR_MAX_CHARS]


class ConfigSetError(RuntimeError):
    """``pulumi config set --secret`` failed; the message is the CLI's, never the value."""


def write_secret_config(project_dir: Path, stack: str, key: str, value: str) -> None:
    """Set ``key`` to ``value`` as a Pulumi secret, the value on the CLI's stdin.

    Raises:
        FileNotFoundError: no Pulumi CLI.
        ConfigSetError: the CLI refused (its stderr, which never holds the value).
    """
    result = subprocess.run([CLI, "config", "set", key, "--secret", "--stack", stack],
                            input=value, capture_output=True, text=True, cwd=project_dir,
                            timeout=CONFIG_SET_TIMEOUT)
    if result.returncode != 0:
        raise ConfigSetError(f"pulumi config set {key} --secret exited with "
                             f"{result.returncode}\n stderr: {result.stderr}")


@dataclass(frozen=True)
class PulumiStack:
    """One stack of the Pulumi program in ``project_dir``.

    Parameters:
        name: ``ORG/PROJECT/STACK`` (or a shorter reference the backend accepts).
        project_dir: the directory holding ``Pulumi.yaml``.
        automation: the Automation API module (``pulumi.automation``); tests
            pass a fake to record the calls. Loaded on first use when None.
        secret_writer: sets one secret config value, ``(stack, key, value)``;
            None: :func:`write_secret_config` in ``project_dir``.
    """

    name: str
    project_dir: Path
    automation: Any = None
    secret_writer: Callable[[str, str, str], None] | None = None

    def check(self) -> None:
        """Everything :meth:`apply` needs that can be checked without running it.

        Raises:
            PulumiUnavailable: no CLI or no SDK.
            ValueError: no Pulumi.yaml in ``project_dir``.
        """
        check_cli()
        if self.automation is None:
            load_automation()
        if not (self.project_dir / PROJECT_FILE).is_file():
            raise ValueError(f"no {PROJECT_FILE} in {self.project_dir}: pass --project-dir, "
                             "the streamboss checkout holding the Pulumi program")

    def apply(self, config: StackConfig,
              on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Set ``streamboss:operations`` and the secret ``streamboss:operationsEnv``
        from ``config``, preview, then update.

        Parameters:
            config: the rendered values (``stack_config.stack_config``).
            on_phase: told ``previewing`` and then ``updating`` as each starts.

        Returns:
            ``{"preview": {op: count}, "update": {"result": ..., "changes": {op: count}}}``.

        Raises:
            PulumiUnavailable: the CLI went missing (FileNotFoundError from the API).
            StackError: a step failed; ``phase`` says which.
        """
        auto = self.automation if self.automation is not None else load_automation()
        tell = on_phase or (lambda _phase: None)
        summary: dict[str, Any] = {}
        phase = "select"
        try:
            stack = auto.select_stack(stack_name=self.name, work_dir=str(self.project_dir))
            phase = "config"
            stack.set_config(CONFIG_KEY, auto.ConfigValue(value=config.operations,
                                                          secret=False))
            write_secret = self.secret_writer or (
                lambda name, key, value: write_secret_config(self.project_dir, name, key,
                                                             value))
            write_secret(self.name, ENV_CONFIG_KEY, config.env)
            phase = "preview"
            tell("previewing")
            preview = stack.preview(message=UPDATE_MESSAGE)
            summary["preview"] = _op_counts(getattr(preview, "change_summary", None))
            phase = "update"
            tell("updating")
            result = stack.up(message=UPDATE_MESSAGE)
        except FileNotFoundError:
            raise PulumiUnavailable(CLI_MISSING) from None
        except Exception as exc:
            message = one_line(exc)
            if type(exc).__name__ == "StackNotFoundError":
                message = (f"stack {self.name} does not exist: run `pulumi stack init "
                           f"{self.name}` in {self.project_dir} and set its config")
            raise StackError(phase, f"{phase} failed: {message}", summary) from exc
        update = getattr(result, "summary", None)
        outcome = str(getattr(update, "result", "succeeded"))
        summary["update"] = {"result": outcome,
                             "changes": _op_counts(getattr(update, "resource_changes", None))}
        if outcome != "succeeded":
            raise StackError("update", f"update failed: result {outcome}", summary)
        return summary


def _op_counts(changes: Any) -> dict[str, int]:
    # OpType is a str Enum; plain strings make the summary JSON.
    if not changes:
        return {}
    return {str(getattr(op, "value", op)): int(count) for op, count in sorted(
        changes.items(), key=lambda item: str(getattr(item[0], "value", item[0])))}
