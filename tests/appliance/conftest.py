"""Fixtures for the appliance tests: a local test host, Ansible runs, Packer runs.

The "test host" is this machine reached over SSH: an sshd of our own on a free
loopback port (its own host key, an ed25519 key we authorise, UsePAM no), logged
into as root. The roles write every file under a prefix directory of this session
(venvs, /etc/streamboss, units, sshd and journald drop-ins), so nothing of the
machine's own configuration is touched; what they do install for real are Debian
packages (python3-venv, unattended-upgrades, ...) and one system user.

These machines have no systemd as PID 1: the roles detect that and leave
enabling/starting units to systemd's absence; the tests run the unit's own
ExecStart as the unit's user instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.conftest import BROKER_URL, free_port, wait_until
from tests.requirements import require

from .private_broker import PrivateBroker
from .private_broker import available as private_broker_problem

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
APPLIANCE_DIR = REPO / "appliance"
# The venv running pytest has ansible-playbook, ansible-lint and moto_server.
VENV_BIN = Path(sys.executable).parent
SSHD = "/usr/sbin/sshd"
# Debian's python; the SSH login shell here has pyenv shims that interpreter
# discovery would pick and fail on.
TARGET_PYTHON = "/usr/bin/python3"
# The service user the roles create for real (a system user, no login).
SERVICE_USER = "streamboss-ci"
# The user the agent's programs run as, also created for real.
CHILD_USER = "streamboss-ci-child"
# systemd gives services this PATH.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PLAYBOOK_TIMEOUT = 600


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "appliance: Ansible roles and Packer templates run against a local test host "
        "(needs sshd, packer, root and network namespaces; without them skipped with a "
        "reason, or failed in CI)",
    )


# -- what the machine must have -------------------------------------------------


def need_sshd() -> None:
    require(Path(SSHD).exists() and shutil.which("ssh-keygen") is not None,
            "needs OpenSSH's sshd and ssh-keygen (apt-get install openssh-server)")
    require(os.geteuid() == 0, "the local test host is logged into as root: run as root")


def need_packer() -> str:
    packer = shutil.which("packer")
    require(packer is not None, "needs packer on PATH (apt-get install packer)")
    assert packer is not None
    return packer


def need_netns() -> None:
    require(os.geteuid() == 0 and shutil.which("ip") is not None,
            "needs root and iproute2 for a network namespace")
    name = f"sb-probe-{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    require(probe.returncode == 0,
            f"cannot create a network namespace here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", name], check=False)


def need_ansible() -> None:
    for tool in ("ansible-playbook", "ansible-lint"):
        require((VENV_BIN / tool).exists(),
                f"needs {tool} in {VENV_BIN} (pip install -e '.[test]')")


# -- the session's work directory --------------------------------------------------


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """A directory the service user can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sb-appliance-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        _end_ssh_masters(path)
        shutil.rmtree(path, ignore_errors=True)


def _end_ssh_masters(workdir: Path) -> None:
    """SSH's ControlPersist masters of this session's Ansible runs (their sockets live under
    ``workdir``) would linger for a minute after the session: end them now."""
    marker = f"ssh: {workdir}/".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (proc / "cmdline").read_bytes().startswith(marker):
                os.kill(int(proc.name), signal.SIGTERM)


@pytest.fixture(scope="session")
def wheels(workdir: Path) -> Path:
    """The streamboss wheel alone (its dependencies come from the machine's index)."""
    out = workdir / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def wheelhouse(workdir: Path, wheels: Path) -> Path:
    """The streamboss wheel and every dependency's: installs with no index at all."""
    out = workdir / "wheelhouse"
    wheel = next(wheels.glob("streamboss-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out), str(wheel)],
                   check=True, capture_output=True, text=True)
    return out


# -- the local test host -------------------------------------------------------------


@dataclass
class SshHost:
    """An sshd on 127.0.0.1 that Ansible and Packer log into as root."""

    address: str
    port: int
    key: Path
    keydir: Path

    def ssh_args(self) -> str:
        return "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o IdentitiesOnly=yes"


def make_keys(keydir: Path) -> None:
    keydir.mkdir(mode=0o700, exist_ok=True)
    for name in ("client", "host"):
        if not (keydir / name).exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sb-{name}",
                            "-f", str(keydir / name)], check=True)


def sshd_config(keydir: Path, address: str, port: int, name: str) -> Path:
    config = keydir / f"sshd_config.{name}"
    config.write_text(
        f"Port {port}\n"
        f"ListenAddress {address}\n"
        f"HostKey {keydir / 'host'}\n"
        f"AuthorizedKeysFile {keydir / 'client.pub'}\n"
        f"PidFile {keydir / f'sshd.{name}.pid'}\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "Subsystem sftp internal-sftp\n"
        "LogLevel ERROR\n"
    )
    return config


def wait_port(address: str, port: int, timeout: float = 15.0,
              netns: str | None = None) -> None:
    def listening() -> bool:
        if netns is None:
            try:
                socket.create_connection((address, port), timeout=0.5).close()
            except OSError:
                return False
            return True
        probe = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c",
             f"import socket; socket.create_connection(({address!r}, {port}), 0.5).close()"],
            capture_output=True)
        return probe.returncode == 0

    wait_until(listening, timeout, f"something listening on {address}:{port}", interval=0.1)


def start_sshd(keydir: Path, address: str, port: int, name: str,
               netns: str | None = None) -> subprocess.Popen[bytes]:
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    config = sshd_config(keydir, address, port, name)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    log = open(keydir / f"sshd.{name}.log", "ab")  # noqa: SIM115 - lives as long as sshd
    process = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(config)],
                               stdout=log, stderr=log)
    wait_port(address, port, netns=netns)
    return process


def stop(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def test_host(workdir: Path) -> Iterator[SshHost]:
    need_sshd()
    keydir = workdir / "ssh"
    make_keys(keydir)
    port = free_port()
    sshd = start_sshd(keydir, "127.0.0.1", port, "host")
    try:
        yield SshHost("127.0.0.1", port, keydir / "client", keydir)
    finally:
        stop(sshd)


# -- Ansible -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ansible_env(workdir: Path) -> dict[str, str]:
    """Ansible's environment: its config, and its state in this session's directory."""
    need_ansible()
    home = workdir / "ansible-home"
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TMP": str(workdir / "ansible-remote-tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
        "XDG_CACHE_HOME": str(workdir / "cache"),
    }


@dataclass
class PlaybookRun:
    args: list[str]
    returncode: int
    output: str
    seconds: float

    def recap(self) -> dict[str, dict[str, int]]:
        """host -> {ok, changed, unreachable, failed, skipped, rescued, ignored}."""
        hosts: dict[str, dict[str, int]] = {}
        in_recap = False
        for line in self.output.splitlines():
            if line.startswith("PLAY RECAP"):
                in_recap = True
                continue
            if in_recap and ":" in line:
                host, counts = line.split(":", 1)
                hosts[host.strip()] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
        return hosts

    def changed_tasks(self) -> list[str]:
        """The tasks that reported a change, with the host ("TASK name: host")."""
        found: list[str] = []
        task = ""
        for line in self.output.splitlines():
            if line.startswith("TASK ["):
                task = line[len("TASK ["):line.rfind("]")]
            elif line.startswith("changed: ["):
                found.append(f"{task}: {line}")
        return found

    def explain(self) -> str:
        command = " ".join(self.args)
        return f"ansible-playbook {command} -> rc {self.returncode}\n{self.output[-8000:]}"


def run_playbook(env: dict[str, str], playbook: str, inventory: Path, *args: str,
                 timeout: float = PLAYBOOK_TIMEOUT,
                 on_line: Callable[[str], None] | None = None) -> PlaybookRun:
    """Run a playbook from ansible/; ``on_line`` sees each output line as it is printed."""
    argv = ["-i", str(inventory), playbook, *args]
    started = time.monotonic()
    process = subprocess.Popen([str(VENV_BIN / "ansible-playbook"), *argv], cwd=ANSIBLE_DIR,
                               env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
        process.wait()
    finally:
        timer.cancel()
        process.stdout.close()
    return PlaybookRun(argv, process.returncode, "".join(lines), time.monotonic() - started)


# -- the node: what site.yml makes of the test host --------------------------------------


@dataclass
class Node:
    """The test host converged under ``prefix`` as a stream-agent node that also runs the
    stream manager and the broker (one host in all three groups, as a small deployment
    would be)."""

    prefix: Path
    inventory: Path
    operation: str
    input: str
    output: str
    manager_port: int
    manager_token: str
    # The rabbitmq role's target: a private node, and the host vars that point the role at it.
    broker_node: PrivateBroker
    broker_vars: dict[str, Any]
    user: str = SERVICE_USER
    runs: list[PlaybookRun] = field(default_factory=list)

    @property
    def venv(self) -> Path:
        return self.prefix / "opt/streamboss/agent"

    @property
    def config_dir(self) -> Path:
        return self.prefix / "etc/streamboss"

    @property
    def unit_dir(self) -> Path:
        return self.prefix / "etc/systemd/system"

    @property
    def unit(self) -> Path:
        return self.unit_dir / "stream-agent.service"

    @property
    def lifecycle_unit(self) -> Path:
        return self.unit_dir / "stream-agent-lifecycle.service"

    @property
    def manager_unit(self) -> Path:
        return self.unit_dir / "stream-manager.service"

    @property
    def state_unit(self) -> Path:
        return self.unit_dir / "streamboss-state.service"


# Directories every Debian system has, which the roles write into but do not create.
SYSTEM_DIRS = ("etc/apt/apt.conf.d", "etc/systemd/system")


def node_paths(prefix: Path) -> dict[str, Any]:
    """Every path the roles write, moved under ``prefix`` (made to look like a system)."""
    for directory in SYSTEM_DIRS:
        (prefix / directory).mkdir(parents=True, exist_ok=True, mode=0o755)
    return {
        "common_service_user": SERVICE_USER,
        "common_service_group": SERVICE_USER,
        # Not per prefix: concurrent sessions share the user and must agree on it.
        "common_service_home": "/var/lib/streamboss-ci",
        "common_timesyncd_config_dir": str(prefix / "etc/systemd/timesyncd.conf.d"),
        "common_apt_config_dir": str(prefix / "etc/apt/apt.conf.d"),
        "common_journald_config_dir": str(prefix / "etc/systemd/journald.conf.d"),
        "common_sshd_config_dir": str(prefix / "etc/ssh/sshd_config.d"),
        "stream_agent_user": SERVICE_USER,
        "stream_agent_group": SERVICE_USER,
        "stream_agent_child_user": CHILD_USER,
        "stream_agent_venv_dir": str(prefix / "opt/streamboss/agent"),
        "stream_agent_config_dir": str(prefix / "etc/streamboss"),
        "stream_agent_unit_dir": str(prefix / "etc/systemd/system"),
        "stream_manager_user": SERVICE_USER,
        "stream_manager_group": SERVICE_USER,
        "stream_manager_venv_dir": str(prefix / "opt/streamboss/manager"),
        "stream_manager_config_dir": str(prefix / "etc/streamboss"),
        "stream_manager_unit_dir": str(prefix / "etc/systemd/system"),
        "stream_manager_libexec_dir": str(prefix / "usr/local/libexec/streamboss"),
        "stream_manager_state_dir": str(prefix / "var/lib/streamboss/manager"),
    }


def connection_vars(host: SshHost) -> dict[str, Any]:
    return {
        "ansible_host": host.address,
        "ansible_port": host.port,
        "ansible_user": "root",
        "ansible_become": False,
        "ansible_python_interpreter": TARGET_PYTHON,
        "ansible_ssh_private_key_file": str(host.key),
        "ansible_ssh_common_args": host.ssh_args(),
    }


def write_inventory(path: Path, groups: dict[str, dict[str, Any]],
                    all_vars: dict[str, Any]) -> Path:
    """A YAML inventory (JSON is YAML): ``groups`` maps a group to its hosts' vars."""
    inventory = {"all": {"vars": all_vars, "children": {
        group: {"hosts": hosts} for group, hosts in groups.items()}}}
    path.write_text(json.dumps(inventory, indent=2))
    return path


@pytest.fixture(scope="session")
def session_names() -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {"operation": f"t-appl-upper-{run}", "input": f"t-appl-in-{run}",
            "output": f"t-appl-out-{run}"}


@pytest.fixture(scope="session")
def private_broker(workdir: Path) -> Iterator[PrivateBroker]:
    """A RabbitMQ node of this session's own (tests/appliance/private_broker.py), running
    from its bootstrap configuration until the rabbitmq role's files replace it."""
    problem = private_broker_problem()
    require(problem is None, problem or "")
    broker = PrivateBroker(workdir / "rabbitmq-node", dist_port=free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def node(workdir: Path, test_host: SshHost, wheels: Path, session_names: dict[str, str],
         private_broker: PrivateBroker) -> Iterator[Node]:
    """The test host as a stream-agent node (not yet converged): its inventory."""
    prefix = workdir / "node"
    prefix.mkdir(mode=0o755)
    host_vars = {
        **connection_vars(test_host),
        **node_paths(prefix),
        "stream_agent_wheels": str(wheels),
        "stream_agent_operation": session_names["operation"],
        "stream_agent_input": session_names["input"],
        "stream_agent_output": session_names["output"],
        "stream_agent_definition": {"exec": "tr a-z A-Z", "name": "upper"},
        "stream_agent_broker_url": BROKER_URL,
        "stream_agent_drain_timeout": 20,
        # The manager shares the agent's virtualenv here (one install per session).
        "stream_manager_venv_dir": str(prefix / "opt/streamboss/agent"),
        "stream_manager_wheels": str(wheels),
        "stream_manager_broker_url": BROKER_URL,
        "stream_manager_host": "127.0.0.1",
        "stream_manager_port": free_port(),
        "stream_manager_token": f"ci-token-{uuid.uuid4().hex}",
    }
    # The rabbitmq role converges the session's private node (its rabbitmqctl is a wrapper
    # naming that node) with every file under the prefix: the machine's shared broker is
    # never touched. With systemd absent the role restarts nothing; role_broker restarts
    # the node from the files the role wrote, as the role's handler would.
    broker_vars = {
        "rabbitmq_config_dir": str(prefix / "etc/rabbitmq"),
        "rabbitmq_systemd_dropin_dir": str(prefix / "etc/systemd/system/rabbitmq.service.d"),
        "rabbitmq_ctl": str(private_broker.ctl),
        "rabbitmq_listen_address": "127.0.0.1",
        "rabbitmq_amqps_port": free_port(),
        "rabbitmq_management_tls_port": free_port(),
        "rabbitmq_tls_server_names": ["localhost"],
    }
    inventory = write_inventory(workdir / "node-inventory.yml", {
        "stream_agents": {"agent-1": {**host_vars, **broker_vars}},
        "stream_managers": {"agent-1": {}}, "brokers": {"agent-1": {}}}, {})
    try:
        yield Node(prefix, inventory, **session_names,
                   manager_port=host_vars["stream_manager_port"],
                   manager_token=host_vars["stream_manager_token"],
                   broker_node=private_broker, broker_vars=broker_vars)
    finally:
        _forget_topology(session_names)


@dataclass
class RoleBroker:
    """The private node as the rabbitmq role left it: its TLS listeners, its CA, the
    streamboss users' generated passwords (read from the files the role kept)."""

    node: PrivateBroker
    config_dir: Path
    amqps_port: int
    management_port: int
    vhost: str = "streamboss"

    @property
    def ca(self) -> Path:
        return self.config_dir / "tls" / "ca.crt"

    def password(self, user: str) -> str:
        return (self.config_dir / "streamboss-credentials" / user).read_text()

    def url(self, user: str, host: str = "localhost") -> str:
        return (f"amqps://{user}:{self.password(user)}@{host}:{self.amqps_port}/"
                f"{self.vhost}")

    @property
    def management_url(self) -> str:
        return f"https://localhost:{self.management_port}"


@pytest.fixture(scope="session")
def role_broker(converged: Node) -> RoleBroker:
    """The private node restarted from the configuration the rabbitmq role wrote (what the
    role's handler does under systemd): TLS listeners, the role's users, no guest."""
    config_dir = Path(converged.broker_vars["rabbitmq_config_dir"])
    converged.broker_node.restart(config_dir)
    return RoleBroker(converged.broker_node, config_dir,
                      converged.broker_vars["rabbitmq_amqps_port"],
                      converged.broker_vars["rabbitmq_management_tls_port"])


def _forget_topology(names: dict[str, str]) -> None:
    with contextlib.suppress(Exception):
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        channel = connection.channel()
        channel.queue_delete(f"sb.op.{names['operation']}")
        for stream in (names["input"], names["output"], f"{names['operation']}.dead"):
            channel.exchange_delete(f"sb.stream.{stream}")
        connection.close()


@pytest.fixture(scope="session")
def converged(node: Node, ansible_env: dict[str, str]) -> Node:
    """The node after its first ``site.yml`` run (which must succeed)."""
    run = run_playbook(ansible_env, "site.yml", node.inventory)
    node.runs.append(run)
    assert run.returncode == 0, run.explain()
    return node


# -- running a unit's command the way systemd would --------------------------------------


@dataclass
class Unit:
    """The few keys of a unit file that say how systemd would start its command."""

    path: Path
    exec_start: list[str]
    user: str
    group: str
    environment_files: list[tuple[Path, bool]]
    environment: dict[str, str]
    working_directory: str | None
    keys: dict[str, list[str]]


def read_unit(path: Path) -> Unit:
    keys: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        keys.setdefault(key.strip(), []).append(value.strip())
    files = []
    for value in keys.get("EnvironmentFile", []):
        optional = value.startswith("-")
        files.append((Path(value.lstrip("-")), optional))
    environment = {}
    for value in keys.get("Environment", []):
        for item in shlex.split(value):
            name, _, setting = item.partition("=")
            environment[name] = setting
    user = keys.get("User", ["root"])[-1]
    return Unit(path, shlex.split(keys["ExecStart"][-1]), user,
                keys.get("Group", [user])[-1], files, environment,
                keys.get("WorkingDirectory", [None])[-1], keys)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def unit_environment(unit: Unit, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What systemd would give the command: a bare environment, Environment=, then the
    EnvironmentFile= files (which override Environment=)."""
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "USER": unit.user, "LOGNAME": unit.user,
           "HOME": "/", "SHELL": "/usr/sbin/nologin", **unit.environment}
    for path, optional in unit.environment_files:
        if path.exists():
            env.update(read_env_file(path))
        elif not optional:
            raise AssertionError(f"{unit.path}: EnvironmentFile {path} is missing")
    env.update(extra or {})
    return env


def start_as_unit(unit: Unit, log: Path, extra_env: dict[str, str] | None = None,
                  ) -> subprocess.Popen[bytes]:
    """Run the unit's ExecStart as its User=/Group= (setpriv execs, so the process we
    hold is the service's main process, as systemd's MainPID would be)."""
    env = unit_environment(unit, extra_env)
    # systemd expands ${VAR} in ExecStart from that environment.
    command = [re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), arg)
               for arg in unit.exec_start]
    argv = ["setpriv", f"--reuid={unit.user}", f"--regid={unit.group}", "--init-groups",
            *capability_flags(unit), "--", *command]
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen(argv, env=env,
                            cwd=unit.working_directory or "/", stdout=handle, stderr=handle)


def capability_flags(unit: Unit) -> list[str]:
    """setpriv's flags for the unit's CapabilityBoundingSet=, AmbientCapabilities= and
    NoNewPrivileges= (systemd grants ambient capabilities through the inheritable set)."""
    def names(key: str) -> list[str] | None:
        values = unit.keys.get(key)
        if values is None:
            return None
        return [cap.lower().removeprefix("cap_") for cap in values[-1].split()]

    flags: list[str] = []
    bounding = names("CapabilityBoundingSet")
    if bounding is not None:
        flags.append("--bounding-set=" + ",".join(["-all", *(f"+{c}" for c in bounding)]))
    ambient = names("AmbientCapabilities")
    if ambient:
        listed = ",".join(f"+{c}" for c in ambient)
        flags += [f"--inh-caps={listed}", f"--ambient-caps={listed}"]
    if unit.keys.get("NoNewPrivileges", [""])[-1] == "yes":
        flags.append("--no-new-privs")
    return flags


def terminate(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"process {process.pid} ignored SIGTERM for {timeout:g}s") from None
