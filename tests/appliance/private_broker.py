"""A second RabbitMQ node of the test session's own, for converging the rabbitmq role.

The machine's broker (rabbit@localhost on 127.0.0.1:5672) is shared by every test and
helper: the role must never reconfigure, restart it or delete its guest user. This
node is the role's target instead: its own name, data, logs, Erlang distribution port
and listener ports, all under the session's directory, run as the ``rabbitmq`` user
from Debian's package (so the role's file owners and modes are the ones a real
service meets). It shares only the machine's epmd and the rabbitmq user's Erlang
cookie, which is how ``rabbitmqctl -n NODE`` (the role's ``rabbitmq_ctl``, a wrapper
script) reaches it.

Started first from a bootstrap configuration (no listener), so the role can create
users on it; then restarted from the files the role rendered, as the role's handler
would restart the service under systemd.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/sbin/rabbitmqctl"
SERVICE_USER = "rabbitmq"
# The rabbitmq user's home holds the Erlang cookie rabbitmqctl uses.
SERVICE_HOME = "/var/lib/rabbitmq"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0


def available() -> str | None:
    """Why a private node cannot run here, or None."""
    if os.geteuid() != 0:
        return "a second RabbitMQ node runs as the rabbitmq user: run as root"
    if not Path(RABBITMQ_SERVER).exists() or not Path(RABBITMQCTL).exists():
        return "needs Debian's rabbitmq-server package (apt-get install rabbitmq-server)"
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return "needs the rabbitmq system user (Debian's rabbitmq-server package)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    return None


@dataclass
class PrivateBroker:
    """One node under ``base``; ``ctl`` is a rabbitmqctl that talks to it alone."""

    base: Path
    dist_port: int
    node: str = field(default_factory=lambda: f"sb-role-{uuid.uuid4().hex[:8]}@localhost")
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for name in ("mnesia", "log"):
            (self.base / name).mkdir(exist_ok=True)
        user = pwd.getpwnam(SERVICE_USER)
        for path in (self.base, self.base / "mnesia", self.base / "log"):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.base.chmod(0o755)
        self.ctl = self.base / "rabbitmqctl"
        self.ctl.write_text(f'#!/bin/sh\nexec {RABBITMQCTL} -n {self.node} "$@"\n')
        self.ctl.chmod(0o755)
        bootstrap = self.base / "bootstrap"
        bootstrap.mkdir(exist_ok=True)
        (bootstrap / "rabbitmq.conf").write_text("listeners.tcp = none\n")
        (bootstrap / "enabled_plugins").write_text("[].\n")
        (bootstrap / "rabbitmq-env.conf").write_text("")
        for path in bootstrap.iterdir():
            path.chmod(0o644)
        self.bootstrap = bootstrap

    def environment(self, config_dir: Path) -> dict[str, str]:
        """The node's environment, reading rabbitmq.conf, enabled_plugins and
        rabbitmq-env.conf from ``config_dir``."""
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": SERVICE_HOME,
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(config_dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(config_dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(config_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
        }

    def start(self, config_dir: Path | None = None) -> None:
        """Start the node from ``config_dir`` (the bootstrap configuration by default)
        and wait until it has booted."""
        assert self.process is None or self.process.poll() is not None
        env = self.environment(config_dir or self.bootstrap)
        log = open(self.base / "server.out", "ab")  # noqa: SIM115 - lives with the node
        self.process = subprocess.Popen(
            ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups",
             "--", RABBITMQ_SERVER], env=env, cwd=self.base, stdout=log, stderr=log,
            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the private RabbitMQ node exited with "
                                     f"{self.process.returncode}:\n{self.log()}")
            if self.ctl_run("await_startup", "--timeout", "5").returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"the private RabbitMQ node did not boot in {START_TIMEOUT:g}s:\n"
                             f"{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.ctl_run("stop", timeout=STOP_TIMEOUT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Only this node's own process group: the shared broker is another one.
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def restart(self, config_dir: Path) -> None:
        self.stop()
        self.start(config_dir)

    def ctl_run(self, *args: str, stdin: str | None = None,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.ctl), "--quiet", *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        text = (self.base / "server.out").read_text(errors="replace")
        for path in sorted((self.base / "log").glob("*.log")):
            text += f"\n--- {path.name}\n" + path.read_text(errors="replace")[-4000:]
        return text[-8000:]
