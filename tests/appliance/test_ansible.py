"""Ansible for real: site.yml converges the test host as a broker, stream-manager and
stream-agent node (a second run changes nothing); the units it wrote pass systemd's
checks and their own commands, run as their user, work (the agent transforms messages
from the real broker, also from the Pulumi program's user data); upgrade-agents.yml
drains the agent with SIGTERM without losing a message and stops at an unhealthy node;
rotate-broker-credentials.yml and collect-logs.yml run against the same host."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pika
import pytest

from infra.user_data import AGENT_SERVICE, agent_user_data
from tests.conftest import wait_until
from tests.requirements import require

from .conftest import (
    BROKER_URL,
    CHILD_USER,
    SERVICE_USER,
    Node,
    connection_vars,
    node_paths,
    read_env_file,
    read_unit,
    run_playbook,
    start_as_unit,
    terminate,
    unit_environment,
    write_inventory,
)
from .test_broker_permissions import regexps as permission_regexps

pytestmark = pytest.mark.appliance

# systemd-analyze security's score: 0 (locked down) .. 10 (exposed); "OK" is below 2.
MAX_EXPOSURE = 2.0
READY = 30.0


def test_site_converges_a_stream_agent_node_and_a_second_run_changes_nothing(
        converged: Node, ansible_env):
    first = converged.runs[0]
    assert first.recap()["agent-1"]["failed"] == 0
    assert first.recap()["agent-1"]["changed"] > 0
    second = run_playbook(ansible_env, "site.yml", converged.inventory)
    assert second.returncode == 0, second.explain()
    assert second.recap()["agent-1"]["changed"] == 0, second.changed_tasks()
    print(f"site.yml: first run {first.seconds:.1f}s, second {second.seconds:.1f}s")


def test_the_node_has_what_the_roles_promise(converged: Node, tmp_path):
    prefix = converged.prefix
    user = pwd.getpwnam(SERVICE_USER)
    assert user.pw_shell == "/usr/sbin/nologin"
    assert user.pw_uid < 1000, "a system user"
    # agent.json is the agent's to read; agent.env systemd's (PID 1, root) alone.
    for name, owner in (("agent.json", user.pw_uid), ("agent.env", 0)):
        info = (converged.config_dir / name).stat()
        assert (info.st_mode & 0o777, info.st_uid) == (0o600, owner), name
    child = pwd.getpwnam(CHILD_USER)
    assert child.pw_shell == "/usr/sbin/nologin" and child.pw_uid < 1000
    assert child.pw_uid != user.pw_uid and child.pw_gid != user.pw_gid
    assert not Path(child.pw_dir).exists(), "no home"
    config = json.loads((converged.config_dir / "agent.json").read_text())
    assert config == {"operation": {"name": converged.operation, "input": converged.input,
                                    "output": converged.output},
                      "definition": {"exec": "tr a-z A-Z", "name": "upper"}}
    assert read_env_file(converged.config_dir / "agent.env") == {
        "STREAMBOSS_BROKER_URL": BROKER_URL}
    venv = converged.venv
    assert (venv / "bin/stream-agent").exists()
    assert (venv / "bin/streamboss-env").stat().st_mode & 0o777 == 0o755
    assert venv.stat().st_uid == 0, "the service user cannot change its own code"
    sshd = (prefix / "etc/ssh/sshd_config.d/10-streamboss-hardening.conf").read_text()
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    check = subprocess.run(["/usr/sbin/sshd", "-t", "-f",
                            str(prefix / "etc/ssh/sshd_config.d/10-streamboss-hardening.conf")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    journald = (prefix / "etc/systemd/journald.conf.d/streamboss.conf").read_text()
    assert "SystemMaxUse=512M" in journald
    assert "NTP=169.254.169.123" in (
        prefix / "etc/systemd/timesyncd.conf.d/streamboss.conf").read_text()
    # apt reads the snippets in order: after the package's own 50unattended-upgrades (which
    # allows all of stable), ours #clears the list and allows only the security archive.
    apt_dir = prefix / "etc/apt/apt.conf.d"
    parts = tmp_path / "apt.conf.d"
    parts.mkdir()
    for source in [Path("/etc/apt/apt.conf.d/50unattended-upgrades"), *apt_dir.iterdir()]:
        (parts / source.name).write_text(source.read_text())
    (tmp_path / "apt.conf").write_text(f'Dir::Etc::Parts "{parts}/";\n')
    merged = subprocess.run(["apt-config", "dump", "Unattended-Upgrade::Origins-Pattern"],
                            env={**os.environ, "APT_CONFIG": str(tmp_path / "apt.conf")},
                            capture_output=True, text=True, check=True)
    origins = re.findall(r'Origins-Pattern:: "(.*)";', merged.stdout)
    assert origins and all("label=Debian-Security" in o for o in origins), merged.stdout
    assert 'APT::Periodic::Unattended-Upgrade "1"' in (apt_dir / "20auto-upgrades").read_text()


def test_the_rabbitmq_role_makes_a_user_per_role_tls_files_and_no_guest(converged: Node):
    """On the session's private node (never the shared broker): the three streamboss users
    with exactly their role's permissions (built as test_broker_permissions.py builds
    them), guest deleted; TLS material with its owners and modes; TLS-only listeners."""
    broker = converged.broker_node
    users = json.loads(broker.ctl_run("list_users", "--formatter", "json").stdout)
    assert {u["user"]: sorted(u["tags"]) for u in users} == {
        "streamboss-manager": ["management", "policymaker"], "streamboss-agent": [],
        "streamboss-archiver": []}, "guest is gone"
    for role in ("manager", "agent", "archiver"):
        listed = json.loads(broker.ctl_run("list_user_permissions", f"streamboss-{role}",
                                           "--formatter", "json").stdout)
        assert listed == [{"vhost": "streamboss", **permission_regexps(role)}], role
    config_dir = Path(converged.broker_vars["rabbitmq_config_dir"])
    conf = (config_dir / "rabbitmq.conf").read_text().splitlines()
    amqps = converged.broker_vars["rabbitmq_amqps_port"]
    management = converged.broker_vars["rabbitmq_management_tls_port"]
    assert "listeners.tcp = none" in conf
    assert f"listeners.ssl.default = 127.0.0.1:{amqps}" in conf
    assert f"management.ssl.port = {management}" in conf
    assert not [line for line in conf if line.startswith(("management.tcp", "listeners.tcp."))]
    assert (config_dir / "enabled_plugins").read_text().strip() == "[rabbitmq_management]."
    assert "ERL_EPMD_ADDRESS=127.0.0.1" in (config_dir / "rabbitmq-env.conf").read_text()
    # quorum queues hold file handles: the broker's limit is raised for its service
    limits = converged.prefix / "etc/systemd/system/rabbitmq.service.d/limits.conf"
    assert "LimitNOFILE=65536" in limits.read_text().splitlines()
    # TLS files: the key the service user's alone, the CA key root's alone.
    tls = config_dir / "tls"
    rabbitmq = pwd.getpwnam("rabbitmq").pw_uid
    expected = {tls: (0o750, 0), tls / "server.key": (0o600, rabbitmq),
                tls / "server.crt": (0o644, 0), tls / "ca.crt": (0o644, 0),
                tls / "ca": (0o700, 0), tls / "ca" / "ca.key": (0o600, 0)}
    for path, mode_owner in expected.items():
        info = path.stat()
        assert (info.st_mode & 0o777, info.st_uid) == mode_owner, path
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tls / "ca.crt"),
                             str(tls / "server.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                            str(tls / "server.crt")], capture_output=True, text=True).stdout
    assert "DNS:localhost" in names
    # Generated passwords: root's alone, one per user, 40 letters and digits, all different.
    credentials = config_dir / "streamboss-credentials"
    assert (credentials.stat().st_mode & 0o777, credentials.stat().st_uid) == (0o700, 0)
    passwords = set()
    for path in credentials.iterdir():
        assert (path.stat().st_mode & 0o777, path.stat().st_uid) == (0o600, 0), path
        passwords.add(path.read_text())
        assert re.fullmatch(r"[A-Za-z0-9]{40}", path.read_text()), path.name
    assert len(passwords) == 3
    for run in converged.runs:
        assert not any(password in run.output for password in passwords), "never logged"


def test_the_units_pass_systemd_analyze_verify_and_are_sandboxed(converged: Node):
    require(shutil.which("systemd-analyze") is not None,
            "needs systemd-analyze (Debian's systemd package)")
    units = [converged.unit, converged.manager_unit, converged.state_unit,
             converged.lifecycle_unit]
    verify = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                            capture_output=True, text=True)
    ours = [line for line in (verify.stdout + verify.stderr).splitlines()
            if any(unit.name in line for unit in units)]
    assert verify.returncode == 0 and not ours, verify.stdout + verify.stderr
    for unit in (converged.unit, converged.manager_unit):
        security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                                  capture_output=True, text=True)
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        assert match, security.stdout + security.stderr
        assert float(match.group(1)) <= MAX_EXPOSURE, security.stdout
        keys = read_unit(unit).keys
        for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                           "PrivateTmp": "yes", "ProtectHome": "yes", "KillSignal": "SIGTERM",
                           "KillMode": "mixed", "User": SERVICE_USER}.items():
            assert keys[key] == [value], (unit.name, key)
        assert "guest" not in keys["ExecStart"][0], "no credentials in argv"
    agent = read_unit(converged.unit).keys
    assert agent["TimeoutStopSec"] == ["35"], "the drain timeout (20 s) plus a margin"
    # Programs run as the child user: the agent may switch to it and signal it, nothing more.
    assert f"STREAMBOSS_CHILD_USER={CHILD_USER}" in agent["Environment"]
    caps = "CAP_SETUID CAP_SETGID CAP_KILL"
    assert agent["CapabilityBoundingSet"] == [caps] and agent["AmbientCapabilities"] == [caps]
    assert agent["SystemCallFilter"][-1] == "@setuid"
    assert read_unit(converged.manager_unit).keys["CapabilityBoundingSet"] == [""]
    assert "--drain-timeout 20" in agent["ExecStart"][0]
    # The lifecycle handler: root with no capability at all (systemd sends the agent's
    # SIGTERM), only where user data wrote lifecycle.env, told which unit to stop.
    lifecycle = read_unit(converged.lifecycle_unit).keys
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                               str(converged.lifecycle_unit)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, security.stdout + security.stderr
    assert "User" not in lifecycle and lifecycle["CapabilityBoundingSet"] == [""]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes",
                       "RestartPreventExitStatus": "2"}.items():
        assert lifecycle[key] == [value], ("lifecycle", key)
    assert lifecycle["ConditionPathExists"] == [str(converged.config_dir / "lifecycle.env")]
    assert lifecycle["EnvironmentFile"] == [str(converged.config_dir / "lifecycle.env")]
    assert lifecycle["Environment"] == [f"STREAMBOSS_LIFECYCLE_UNITS={converged.unit.name}"]
    assert lifecycle["ExecStart"][0].startswith(f"{converged.venv}/bin/stream-agent-lifecycle ")
    manager = read_unit(converged.manager_unit).keys
    assert manager["Requires"] == [converged.state_unit.name]
    assert manager["ReadWritePaths"] == [str(converged.prefix / "var/lib/streamboss/manager")]


def _wait_for_consumer(broker, operation: str) -> None:
    queue = f"sb.op.{operation}"
    wait_until(lambda: broker.queue_depth(queue) is not None
               and broker.queue_consumers(queue) >= 1, READY, f"a consumer on {queue}")


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))


def _streams(broker, node: Node):
    broker.create_stream(node.input)
    broker.create_stream(node.output)
    broker.forget_operation(node.operation)
    return broker.capture(node.output)


def test_the_units_own_command_run_as_its_user_transforms_messages(
        converged: Node, broker, tmp_path):
    unit = read_unit(converged.unit)
    capture = _streams(broker, converged)
    agent = start_as_unit(unit, tmp_path / "agent.log")
    try:
        _wait_for_consumer(broker, converged.operation)
        assert _uid_of(agent.pid) == pwd.getpwnam(SERVICE_USER).pw_uid
        bodies = [f"message {i} from the real broker".encode() for i in range(20)]
        broker.publish(converged.input, bodies)
        got = capture.collect(len(bodies))
    finally:
        code = terminate(agent)
    assert sorted(m.body for m in got) == sorted(b.upper() for b in bodies)
    assert code == 0, (tmp_path / "agent.log").read_text()
    assert broker.queue_depth(f"sb.op.{converged.operation}") == 0, "nothing left unacked"


# A program that reports who it runs as and what it can reach of its agent: its uid, its
# capabilities, whether the agent's environ and agent.json are readable, its environment's
# names. Shell tools only (the child user may not reach a virtualenv's Python).
PROBE = ("echo uid=$(id -u) cap=$(grep '^CapEff:' /proc/self/status | cut -f2) "
         "environ=$(cat /proc/$PPID/environ >/dev/null 2>&1 && echo readable || echo denied) "
         "config=$(cat {config} >/dev/null 2>&1 && echo readable || echo denied) "
         "names=$(env | cut -d= -f1 | sort | tr '\\n' ,)")


def test_the_units_programs_run_as_the_child_user_and_reach_nothing_of_the_agent(
        converged: Node, broker, tmp_path):
    config = converged.config_dir / "agent.json"
    saved = (config.read_bytes(), config.stat())
    document = json.loads(saved[0])
    document["definition"] = {"exec": PROBE.format(config=config), "shell": True,
                              "env": {"FROM_DEFINITION": "yes"}}
    try:
        config.write_text(json.dumps(document))
        unit = read_unit(converged.unit)
        capture = _streams(broker, converged)
        agent = start_as_unit(unit, tmp_path / "agent.log")
        try:
            _wait_for_consumer(broker, converged.operation)
            broker.publish(converged.input, [b"who am i"])
            (got,) = capture.collect(1)
        finally:
            code = terminate(agent)
        assert code == 0, (tmp_path / "agent.log").read_text()
    finally:
        config.write_bytes(saved[0])
        os.chown(config, saved[1].st_uid, saved[1].st_gid)
        config.chmod(saved[1].st_mode & 0o777)
    seen = dict(item.split("=", 1) for item in got.body.decode().split())
    assert seen["uid"] == str(pwd.getpwnam(CHILD_USER).pw_uid)
    assert int(seen["cap"], 16) == 0
    assert (seen["environ"], seen["config"]) == ("denied", "denied")
    names = set(filter(None, seen["names"].split(",")))
    assert "FROM_DEFINITION" in names
    assert not names & {"STREAMBOSS_BROKER_URL", "STREAMBOSS_BROKER_URL_PARAMETER",
                        "STREAMBOSS_CHILD_USER"}, names


def test_the_unit_honours_the_pulumi_user_data_contract(
        converged: Node, broker, moto_server, tmp_path):
    """The files the Pulumi program's user data writes (a 0600 agent.json of the agent's
    user, a root-owned 0600 agent.env that only *names* the SSM parameter) are enough:
    streamboss-env reads the broker URL from SSM (moto here) with the node's credentials,
    and the agent runs the operation."""
    import boto3

    parameter = f"/streamboss/test-{converged.operation}/broker-url"
    ssm = boto3.client("ssm", endpoint_url=moto_server.endpoint, region_name="eu-west-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    ssm.put_parameter(Name=parameter, Value=BROKER_URL, Type="SecureString")
    cloud_config = agent_user_data(
        operation=converged.operation, input_stream=converged.input,
        output_stream=converged.output, definition={"exec": ["tr", "a-z", "A-Z"]},
        object_store=f"s3://{moto_server.bucket()}/operations", broker_url_parameter=parameter,
        region="eu-west-1")
    document = json.loads(cloud_config.split("\n", 1)[1])
    assert document["runcmd"] == [["systemctl", "enable", "--now", converged.unit.name]]
    assert converged.unit.name == AGENT_SERVICE
    saved = {}
    for entry in document["write_files"]:
        target = converged.config_dir / Path(entry["path"]).name
        saved[target] = (target.read_bytes(), target.stat())
    try:
        for entry in document["write_files"]:  # as cloud-init would: owner and mode
            target = converged.config_dir / Path(entry["path"]).name
            target.write_text(entry["content"])
            # The images' agent user is streamboss; this test host's is SERVICE_USER.
            owner = entry["owner"].split(":")[0].replace("streamboss", SERVICE_USER)
            assert owner in (SERVICE_USER, "root") and entry["permissions"] == "0600"
            os.chown(target, pwd.getpwnam(owner).pw_uid, pwd.getpwnam(owner).pw_gid)
            target.chmod(int(entry["permissions"], 8))
        assert "STREAMBOSS_BROKER_URL=" not in (converged.config_dir / "agent.env").read_text()
        unit = read_unit(converged.unit)
        capture = _streams(broker, converged)
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_ENDPOINT_URL_SSM": moto_server.endpoint,
               "STREAMBOSS_S3_ENDPOINT_URL": moto_server.endpoint}
        agent = start_as_unit(unit, tmp_path / "agent.log", aws)
        try:
            _wait_for_consumer(broker, converged.operation)
            environ = Path(f"/proc/{agent.pid}/environ").read_bytes().split(b"\0")
            assert f"STREAMBOSS_BROKER_URL={BROKER_URL}".encode() in environ
            assert not any(BROKER_URL.encode() in arg for arg in
                           Path(f"/proc/{agent.pid}/cmdline").read_bytes().split(b"\0"))
            broker.publish(converged.input, [b"user data", b"from pulumi"])
            got = capture.collect(2)
        finally:
            code = terminate(agent)
        assert sorted(m.body for m in got) == [b"FROM PULUMI", b"USER DATA"]
        assert code == 0, (tmp_path / "agent.log").read_text()
    finally:
        for target, (content, info) in saved.items():
            target.write_bytes(content)
            os.chown(target, info.st_uid, info.st_gid)
            target.chmod(info.st_mode & 0o777)


def test_the_manager_units_commands_mount_nothing_without_a_device_and_serve_the_api(
        converged: Node, tmp_path):
    state = read_unit(converged.state_unit)
    assert state.user == "root"
    mount = subprocess.run(state.exec_start, env=unit_environment(state), capture_output=True,
                           text=True, timeout=30)
    assert mount.returncode == 0, mount.stdout + mount.stderr
    assert "no STREAMBOSS_STATE_DEVICE" in mount.stdout
    # root's: systemd reads it as PID 1; the manager's user cannot.
    info = (converged.config_dir / "manager.env").stat()
    assert (info.st_mode & 0o777, info.st_uid) == (0o600, 0)

    unit = read_unit(converged.manager_unit)
    manager = start_as_unit(unit, tmp_path / "manager.log")
    base = f"http://127.0.0.1:{converged.manager_port}"
    try:
        wait_until(lambda: _get(f"{base}/v1/health") == 200, READY, "the manager's API")
        assert _uid_of(manager.pid) == pwd.getpwnam(SERVICE_USER).pw_uid
        assert _get(f"{base}/v1/streams") == 401, "the token is required"
        assert _get(f"{base}/v1/streams", converged.manager_token) == 200
    finally:
        code = terminate(manager)
    assert code == 0, (tmp_path / "manager.log").read_text()
    assert (converged.prefix / "var/lib/streamboss/manager").stat().st_uid == \
        pwd.getpwnam(SERVICE_USER).pw_uid


def _get(url: str, token: str | None = None) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.get(url, headers=headers, timeout=2).status_code
    except httpx.HTTPError:
        return 0


class Publisher(threading.Thread):
    """Publishes numbered messages onto a stream until stopped (its own connection): a
    trickle, and a burst whenever ``burst`` is set."""

    def __init__(self, stream: str, per_second: int = 20, burst: int = 1000) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.per_tick = max(1, per_second // 10)
        self.burst_size = burst
        self.ids: list[str] = []
        self.stop = threading.Event()
        self.burst = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        # One transaction per batch: a burst lands on the queue at once (faster than the
        # agent takes it), and a committed batch is on the broker for sure.
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        try:
            channel = connection.channel()
            channel.tx_select()
            tick = 0
            while not self.stop.is_set():
                count = self.per_tick
                if self.burst.is_set():
                    self.burst.clear()
                    count = self.burst_size
                ids = [f"up-{tick}-{i}" for i in range(count)]
                for ident in ids:
                    channel.basic_publish(
                        f"sb.stream.{self.stream}", "", ident.encode(),
                        pika.BasicProperties(delivery_mode=2, headers={"sb-id": ident}))
                channel.tx_commit()
                self.ids.extend(ids)
                tick += 1
                self.stop.wait(0.1)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connection.close()


def test_upgrade_agents_drains_with_sigterm_loses_nothing_and_stops_at_an_unhealthy_node(
        converged: Node, ansible_env, test_host, workdir: Path, broker, tmp_path):
    """Three agent nodes, one per batch: agent-1 is the converged node with its agent
    running and messages arriving; agent-2 shares its code but its broker does not answer;
    agent-3 is never reached, because agent-2 does not come back healthy."""
    hosts = {"agent-1": None, "agent-2": None, "agent-3": None}
    base = json.loads(converged.inventory.read_text())["all"]["children"]["stream_agents"][
        "hosts"]["agent-1"]
    hosts["agent-1"] = base
    for name in ("agent-2", "agent-3"):
        prefix = workdir / f"upgrade-{name}"
        prefix.mkdir(mode=0o755, exist_ok=True)
        paths = node_paths(prefix)
        hosts[name] = {
            **base, **connection_vars(test_host),
            "stream_agent_config_dir": paths["stream_agent_config_dir"],
            "stream_agent_unit_dir": paths["stream_agent_unit_dir"],
            # nothing listens there: the agent cannot come back healthy
            "stream_agent_broker_url": "amqp://guest:guest@127.0.0.1:9/%2F",
        }
    inventory = write_inventory(workdir / "upgrade-inventory.yml", {"stream_agents": hosts}, {})

    unit = read_unit(converged.unit)
    capture = _streams(broker, converged)
    agent = start_as_unit(unit, tmp_path / "agent.log")
    reaper = threading.Thread(target=agent.wait, daemon=True)  # systemd would reap it too
    reaper.start()
    publisher = Publisher(converged.input)
    def burst_before_the_drain(line: str) -> None:
        # Ansible names the task before it runs it: a burst then keeps the agent busy with a
        # full window when the SIGTERM comes.
        if line.startswith("TASK [stream_agent : Drain | Send the agent SIGTERM"):
            publisher.burst.set()

    try:
        _wait_for_consumer(broker, converged.operation)
        publisher.start()
        run = run_playbook(ansible_env, "upgrade-agents.yml", inventory, "-e", "upgrade_batch=1",
                           on_line=burst_before_the_drain)
    finally:
        publisher.stop.set()
        publisher.join(10)
        if agent.poll() is None:
            agent.kill()
        reaper.join(30)
    assert publisher.error is None, publisher.error
    log = (tmp_path / "agent.log").read_text()
    assert agent.returncode == 0, f"the drained agent exited {agent.returncode}\n{log}"
    draining = re.search(r"SIGTERM received; draining (\d+) in-flight", log)
    assert draining and "drained; exiting" in log, log
    assert int(draining.group(1)) > 0, "the SIGTERM came while messages were in flight"

    recap = run.recap()
    assert run.returncode != 0, run.explain()
    assert recap["agent-1"]["failed"] == 0, run.explain()
    assert recap["agent-2"]["failed"] == 1, run.explain()
    assert "agent-3" not in recap or recap["agent-3"]["ok"] == 0, run.explain()
    assert "[agent-3]" not in run.output, "the play stopped before agent-3's batch"
    assert any("Drain | Send the agent SIGTERM" in line and "[agent-1]" in line
               for line in run.changed_tasks()), run.explain()
    assert re.search(r"fatal: \[agent-2\].*\n(?:.*\n){0,20}?.*cannot reach", run.output), \
        run.explain()

    # Nothing lost: start the node's agent again; every message published before, during
    # and after the drain comes out exactly once.
    restarted = start_as_unit(unit, tmp_path / "agent-again.log")
    try:
        published = set(publisher.ids)
        seen: dict[str, int] = {}

        def all_out() -> bool:
            for message in capture.collect_until_quiet(quiet=0.5, timeout=5):
                assert message.body == message.parent.upper().encode()
                seen[message.parent] = seen.get(message.parent, 0) + 1
            return published <= set(seen)

        wait_until(all_out, 60, f"outputs of all {len(published)} messages", interval=0)
    finally:
        code = terminate(restarted)
    assert code == 0
    assert set(seen) == published
    assert [parent for parent, count in seen.items() if count > 1] == []
    assert broker.queue_depth(f"sb.op.{converged.operation}") == 0
    print(f"upgrade-agents.yml: {run.seconds:.1f}s, {len(published)} messages, "
          f"{draining.group(1)} in flight at SIGTERM, none lost")


def test_rotate_broker_credentials_changes_the_password_and_the_agents_use_the_new_one(
        converged: Node, role_broker, ansible_env, test_host, workdir: Path, monkeypatch):
    """On the private node, over TLS: deleting the agent user's generated password file
    and running the playbook makes a new password (on the broker node, never logged),
    sets it (rabbitmqctl on stdin), and the agent node's agent.env gets a URL built from
    the broker's facts, as the example inventory builds it, with the broker's CA: its
    health check reaches the operation's queue over amqps with the new password."""
    from streamboss.manager.broker import Broker as ManagerBroker

    user = "streamboss-agent"
    old = role_broker.password(user)
    monkeypatch.setenv("STREAMBOSS_BROKER_CA", str(role_broker.ca))
    manager = ManagerBroker(role_broker.url("streamboss-manager"), role_broker.management_url)
    try:
        manager.ensure_stream(converged.input)
        manager.ensure_operation(converged.operation, converged.input)
        base = json.loads(converged.inventory.read_text())["all"]["children"]["stream_agents"][
            "hosts"]["agent-1"]
        paths = node_paths(workdir / "rotate")
        agent_vars = {
            **base, "stream_agent_config_dir": paths["stream_agent_config_dir"],
            "stream_agent_unit_dir": paths["stream_agent_unit_dir"],
            # as inventory/example/group_vars/all/main.yml builds them
            "stream_agent_broker_url": (
                "amqps://streamboss-agent:{{ hostvars['broker-1']['rabbitmq_user_passwords']"
                "['streamboss-agent'] | urlencode }}@localhost:"
                f"{role_broker.amqps_port}/streamboss"),
            "stream_agent_broker_ca": "{{ hostvars['broker-1']['rabbitmq_ca_certificate'] }}"}
        broker_vars = {**connection_vars(test_host), **converged.broker_vars,
                       "rabbitmq_manage_service": False}
        inventory = write_inventory(workdir / "rotate-inventory.yml", {
            "brokers": {"broker-1": broker_vars}, "stream_agents": {"agent-r": agent_vars}}, {})
        (role_broker.config_dir / "streamboss-credentials" / user).unlink()
        run = run_playbook(ansible_env, "rotate-broker-credentials.yml", inventory)
        assert run.returncode == 0, run.explain()
        new = role_broker.password(user)
        assert new != old
        changed = run.changed_tasks()
        assert any("Change the passwords that do not match" in line for line in changed), changed
        assert not any("Create the missing users" in line for line in changed), changed
        assert new not in run.output and old not in run.output, "passwords are never logged"
        node = role_broker.node
        assert node.ctl_run("authenticate_user", user, stdin=old).returncode != 0
        assert node.ctl_run("authenticate_user", user, stdin=new).returncode == 0
        config_dir = Path(paths["stream_agent_config_dir"])
        env = read_env_file(config_dir / "agent.env")
        assert env["STREAMBOSS_BROKER_URL"] == role_broker.url(user)
        assert env["STREAMBOSS_BROKER_CA"] == str(config_dir / "broker-ca.crt")
        assert (config_dir / "broker-ca.crt").read_text() == role_broker.ca.read_text()
        assert re.search(rf"Report the agent's queue.*queue: sb\.op\.{converged.operation}",
                         run.output, re.S), run.explain()
    finally:
        manager.delete_operation(converged.operation, f"sb.dead.{converged.operation}")
        manager.delete_stream(converged.input)
        manager.close()


def test_collect_logs_fetches_an_archive_that_holds_no_secret(converged: Node, ansible_env,
                                                              tmp_path):
    import tarfile

    run = run_playbook(ansible_env, "collect-logs.yml", converged.inventory,
                       "-e", f"logs_dir={tmp_path}", "-e", "since='1 hour ago'")
    assert run.returncode == 0, run.explain()
    (archive,) = tmp_path.glob("agent-1-*.tar.gz")
    with tarfile.open(archive) as tar:
        files = {Path(m.name).name: tar.extractfile(m).read().decode()
                 for m in tar.getmembers() if m.isfile()}
    assert {"journal.txt", "status.txt", "versions.txt", "config-files.txt", "agent-check.txt",
            "stream-agent.service"} <= set(files)
    assert "streamboss==0.1.0" in files["versions.txt"]
    assert "agent.env" in files["config-files.txt"]
    assert f"sb.op.{converged.operation}" in files["agent-check.txt"]
    assert not any("guest:guest" in text for text in files.values())
