"""The manager as deployed: from the Pulumi program's outputs to what the manager process
really uses, link by link, with nothing but hosts and ports substituted.

1. The whole program runs under Pulumi mocks; the manager's launch template carries the
   user data (cloud-config) that writes ``/etc/streamboss/manager.env`` and starts
   ``stream-manager.service``, and the SSM parameters hold the broker URL and the token.
2. The ``stream_manager`` role renders the image's files (its ``config.yml`` and
   ``service.yml`` tasks, as the Packer build runs them, with the image's variables) and
   ``streamboss-env`` as the ``streamboss_venv`` role writes it. The image has no
   manager.env of its own: the user data's is written where the unit reads it.
3. The env file is parsed as systemd's ``EnvironmentFile=`` does, the unit's
   ``Environment=`` first. Then, and only then, every AWS host:port in any value (and in
   the SSM parameters) is replaced by a loopback one: TLS terminators in front of the
   shared broker's AMQP and management ports, serving a certificate for ``localhost``
   from a test CA (``STREAMBOSS_BROKER_CA``, where Amazon MQ's public CA needs none).
   Variable names, schemes, credentials and paths stay as the program wrote them. The
   SSM parameters go into moto; the S3 endpoint is moto's; the API port a free one.
4. The unit's ``ExecStart`` runs with that environment: streamboss-env reads the SSM
   parameters and execs a real ``streamboss manager``.
5. Its ``/v1/status`` (with the token from SSM) names the broker URL, management API
   and archive store it uses, where each came from, and that each answers.

A link that drops or renames a variable shows at step 5: a default, another source, or
something that does not answer (and the manager without its token or broker URL does
not start at all). The last test drops the management URL to show that it does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pika
import pulumi
import pytest
import yaml

from infra.__main__ import build
from infra.operations import parse_operations
from infra.user_data import MANAGER_SERVICE
from streamboss.agent.config import redact
from tests.appliance.conftest import read_env_file, read_unit, unit_environment
from tests.certificates import make_authority, make_server_certificate
from tests.conftest import (
    BROKER_URL,
    MANAGEMENT_PORT,
    MOTO_ENV,
    free_port,
    operation_queues,
    stream_exchange,
    wait_until,
)
from tests.requirements import require
from tests.tls_proxy import TLSProxy

from .conftest import REGION, TOKEN, plain, set_config, stack_config

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"
VENV_BIN = Path(sys.executable).parent
AMQP_UPSTREAM = ("127.0.0.1", 5672)
MANAGEMENT_UPSTREAM = ("127.0.0.1", MANAGEMENT_PORT)
ADMIN = ("guest", "guest")
READY = 60.0


# -- 1. the program's outputs ------------------------------------------------------------


@dataclass
class Deployed:
    """What the program declared for the manager node."""

    cloud_config: dict[str, Any]
    parameters: dict[str, str]  # SSM parameter name -> value (secrets unwrapped)
    broker_host: str
    username: str
    password: str
    group_stacks: set[str]  # the streamboss:stack tag of every agent group
    group_tags: dict[str, str]  # one agent group's tags, as declared


def deploy(stack, username: str, password: str) -> Deployed:
    config = stack_config(brokerUsername=username)
    config["streamboss:brokerPassword"] = password
    set_config(config)
    stack.run(lambda: build(pulumi.Config()).manager.address)
    template = stack.named("manager-lt")
    text = base64.b64decode(plain(template.inputs["userData"])).decode()
    header, _, body = text.partition("\n")
    assert header == "#cloud-config"
    parameters = {d.inputs["name"]: plain(d.inputs["value"])
                  for d in stack.of_type("aws:ssm/parameter:Parameter")}
    (broker,) = stack.of_type("aws:mq/broker:Broker")
    host = urlsplit(broker.state["instances"][0]["consoleUrl"]).hostname
    groups = stack.of_type("aws:autoscaling/group:Group")
    group_stacks = {tag["value"] for group in groups
                    for tag in group.inputs["tags"] if tag["key"] == "streamboss:stack"}
    group_tags = {tag["key"]: tag["value"] for tag in groups[0].inputs["tags"]}
    return Deployed(json.loads(body), parameters, host, username, password, group_stacks,
                    group_tags)


# -- 2. the image's files ----------------------------------------------------------------


@dataclass
class Image:
    """The stream-manager image's files, rendered by its roles under ``prefix``."""

    prefix: Path
    defaults: dict[str, Any]
    config_dir: Path
    unit: Path
    streamboss_env: Path


PLAYBOOK = """
- name: Render the stream-manager image's files as the Packer build's roles write them
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: The stream_manager role's configuration and units
      ansible.builtin.include_role:
        name: stream_manager
        tasks_from: "{{ item }}"
      loop: [config.yml, service.yml]
    - name: streamboss-env, as the streamboss_venv role writes it
      ansible.builtin.template:
        src: "{{ roles_dir }}/streamboss_venv/templates/streamboss-env.j2"
        dest: "{{ out_dir }}/streamboss-env"
        mode: "0755"
      vars:
        streamboss_venv_dir: "{{ venv_dir }}"
"""


def render_image(prefix: Path) -> Image:
    require((VENV_BIN / "ansible-playbook").exists(),
            f"needs ansible-playbook in {VENV_BIN} (pip install -e '.[test]')")
    defaults = yaml.safe_load((ROLES / "stream_manager/defaults/main.yml").read_text())
    moved = {  # only where files go; every other variable is the image's (the role's default)
        "stream_manager_config_dir": str(prefix / "etc/streamboss"),
        "stream_manager_unit_dir": str(prefix / "etc/systemd/system"),
        "stream_manager_state_dir": str(prefix / "var/lib/streamboss/manager"),
        "stream_manager_libexec_dir": str(prefix / "usr/local/libexec/streamboss"),
    }
    (prefix / "etc/systemd/system").mkdir(parents=True)
    (prefix / "out").mkdir()
    playbook = prefix / "render.yml"
    playbook.write_text(PLAYBOOK)
    extra = prefix / "vars.json"
    extra.write_text(json.dumps({**moved, "roles_dir": str(ROLES), "out_dir": str(prefix / "out"),
                                 "venv_dir": sys.prefix}))
    home = prefix / "ansible-home"
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-e", f"@{extra}",
         "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)],
        capture_output=True, text=True, timeout=300, cwd=prefix,
        env={**os.environ, "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_HOME": str(home),
             "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_NOCOLOR": "1",
             "ANSIBLE_CONFIG": str(ROOT / "ansible/ansible.cfg")})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return Image(prefix, defaults, Path(moved["stream_manager_config_dir"]),
                 Path(moved["stream_manager_unit_dir"]) / defaults["stream_manager_service"],
                 prefix / "out/streamboss-env")


def boot(deployed: Deployed, image: Image) -> Path:
    """What cloud-init does with the user data on the image: write its files where the
    image's unit reads them; return the unit it starts."""
    document = deployed.cloud_config
    assert document["runcmd"] == [["systemctl", "enable", "--now", MANAGER_SERVICE]]
    assert image.defaults["stream_manager_service"] == MANAGER_SERVICE
    # The image brings no manager.env of its own: the user data's is the node's.
    assert not (image.config_dir / "manager.env").exists()
    for entry in document["write_files"]:
        path = Path(entry["path"])
        # Written where the image's role (its default config dir) has the unit read it.
        assert str(path.parent) == image.defaults["stream_manager_config_dir"], path
        assert (entry["owner"], entry["permissions"]) == ("root:root", "0600")
        target = image.config_dir / path.name
        target.write_text(entry["content"])
        target.chmod(0o600)
    return image.unit


# -- 3. loopback in place of AWS -----------------------------------------------------------


@dataclass
class Loopback:
    """TLS terminators in front of the shared broker, and the host:port map onto them."""

    ca: Path
    amqps: TLSProxy
    https: TLSProxy

    def ports(self, aws_host: str) -> dict[tuple[str, int], tuple[str, int]]:
        return {(aws_host, 5671): ("localhost", self.amqps.port),
                (aws_host, 443): ("localhost", self.https.port)}


def substitute(value: str, ports: dict[tuple[str, int], tuple[str, int]]) -> str:
    """``value`` with an AWS host:port in a URL replaced by its loopback one; the scheme,
    credentials, path and everything else unchanged. Anything else as it is."""
    parts = urlsplit(value)
    if not parts.scheme or not parts.hostname:
        return value
    port = parts.port or {"https": 443, "amqps": 5671}.get(parts.scheme)
    target = ports.get((parts.hostname, port or 0))
    if target is None:
        return value
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@" if userinfo else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}{target[0]}:{target[1]}"))


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    directory = tmp_path_factory.mktemp("deployed-tls")
    authority = make_authority(directory, "stand-in-ca")
    server = make_server_certificate(authority, directory, "broker", ("localhost",))
    amqps = TLSProxy(server.cert, server.key, AMQP_UPSTREAM)
    https = TLSProxy(server.cert, server.key, MANAGEMENT_UPSTREAM)
    try:
        yield Loopback(authority.cert, amqps, https)
    finally:
        amqps.close()
        https.close()


@pytest.fixture
def broker_user() -> Iterator[tuple[str, str]]:
    """The stack's broker user, made on the shared broker as Amazon MQ makes it (the
    administrator tag: the console's user too); deleted at teardown."""
    name, password = f"sb-deployed-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    api = f"http://127.0.0.1:{MANAGEMENT_PORT}/api"
    assert httpx.put(f"{api}/users/{name}", auth=ADMIN, json={
        "password": password, "tags": "administrator"}).status_code in (201, 204)
    try:
        assert httpx.put(f"{api}/permissions/%2F/{name}", auth=ADMIN, json={
            "configure": ".*", "write": ".*", "read": ".*"}).status_code in (201, 204)
        yield name, password
    finally:
        httpx.delete(f"{api}/users/{name}", auth=ADMIN)


# -- 4. the unit's command -------------------------------------------------------------------


@dataclass
class Node:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    environment: dict[str, str]

    def status(self, token: str) -> dict[str, Any]:
        response = httpx.get(f"http://127.0.0.1:{self.port}/v1/status",
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


def start_unit(unit_path: Path, image: Image, deployed: Deployed, loopback: Loopback,
               moto_endpoint: str, drop: str | None = None) -> Node:
    """Run the unit's ExecStart the way systemd would, in the node's environment with
    loopback in place of AWS (see the module docstring); ``drop``: a variable a broken
    link would have lost."""
    unit = read_unit(unit_path)
    env_file = image.config_dir / "manager.env"
    assert (env_file, True) in unit.environment_files, unit.environment_files
    if drop is not None:
        kept = [line for line in env_file.read_text().splitlines(keepends=True)
                if not line.startswith(f"{drop}=")]
        env_file.write_text("".join(kept))
    ports = loopback.ports(deployed.broker_host)
    environment = {key: substitute(value, ports)
                   for key, value in unit_environment(unit).items()}
    port = free_port()
    environment["STREAMBOSS_API_PORT"] = str(port)  # 8181 on the node
    environment.update({
        # AWS itself (SSM, S3, CloudWatch, Auto Scaling): moto, with its test credentials.
        **{k: v for k, v in MOTO_ENV.items() if k != "AWS_DEFAULT_REGION"},
        "AWS_ENDPOINT_URL": moto_endpoint, "STREAMBOSS_S3_ENDPOINT_URL": moto_endpoint,
        # The stand-in broker's certificate is the test CA's, not a public one.
        "STREAMBOSS_BROKER_CA": str(loopback.ca),
        # The manager's CLI pointer for a generated token (none here) stays in the test.
        "XDG_STATE_HOME": str(image.prefix / "xdg"),
    })
    command = [re.sub(r"\$\{(\w+)\}", lambda m: environment.get(m.group(1), ""), arg)
               for arg in unit.exec_start]
    # The image's virtualenv is this checkout's; streamboss-env is the role's rendering.
    venv_bin = f"{image.defaults['stream_manager_venv_dir']}/bin/"
    assert command[0] == venv_bin + "streamboss-env", command
    assert command[1] == venv_bin + "streamboss" and command[2] == "manager", command
    command[0] = str(image.streamboss_env)
    command[1] = str(VENV_BIN / "streamboss")
    state_dir = Path(unit.working_directory or "")
    state_dir.mkdir(parents=True, exist_ok=True)
    log = image.prefix / f"manager-{port}.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, env=environment, cwd=state_dir,
                                   stdin=subprocess.DEVNULL, stdout=handle, stderr=handle)
    node = Node(process, port, log, environment)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the manager exited with {process.returncode}:\n"
                                 f"{log.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, READY, f"the unit's manager on port {port}", 0.1)
    return node


def stop(node: Node) -> None:
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(60)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


@pytest.fixture
def node_parts(stack, broker_user, loopback, moto_server, tmp_path) -> Iterator[Any]:
    """The program's outputs for the manager node, the image with the user data's files
    written, and AWS (moto) with the program's SSM parameters (loopback in place of AWS
    hosts) and the archive bucket the node's environment names."""
    import boto3

    deployed = deploy(stack, *broker_user)
    image = render_image(tmp_path / "node")
    boot(deployed, image)
    ports = loopback.ports(deployed.broker_host)
    ssm = boto3.client("ssm", endpoint_url=moto_server.endpoint, region_name=REGION,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    for name, value in deployed.parameters.items():
        ssm.put_parameter(Name=name, Value=substitute(value, ports), Type="SecureString",
                          Overwrite=True)
    archive = urlsplit(node_settings(image).get("STREAMBOSS_ARCHIVE_STORE", ""))
    if archive.scheme == "s3":
        moto_server.client().create_bucket(Bucket=archive.netloc)
    try:
        yield deployed, image, moto_server.endpoint
    finally:
        for name in deployed.parameters:
            ssm.delete_parameter(Name=name)


def node_settings(image: Image) -> dict[str, str]:
    """The node's manager.env as systemd reads it (before any substitution)."""
    return read_env_file(image.config_dir / "manager.env")


# -- 5. what the manager says it uses -----------------------------------------------------------


def test_the_deployed_manager_uses_the_stacks_broker_management_api_and_archive(
        node_parts, loopback):
    deployed, image, moto_endpoint = node_parts
    settings = node_settings(image)
    ports = loopback.ports(deployed.broker_host)
    # What the program meant each to be, on AWS, then on loopback.
    management = f"https://{deployed.broker_host}"
    broker_parameter = settings["STREAMBOSS_BROKER_URL_PARAMETER"]
    broker_url = deployed.parameters[broker_parameter]
    assert urlsplit(broker_url).hostname == deployed.broker_host
    assert broker_url.startswith(f"amqps://{deployed.username}:{deployed.password}@")
    archive = f"s3://{urlsplit(settings['STREAMBOSS_ARCHIVE_STORE']).netloc}"
    # One agent group in AWS (moto) with the tags the program gives a pool (its operation
    # renamed, so no other test's group shares it).
    operation = f"deployed-{uuid.uuid4().hex[:8]}"
    tags = {**deployed.group_tags, "streamboss:operation": operation, "Name": operation}
    aws_group(moto_endpoint, operation, tags, desired=2)

    node = start_unit(image.unit, image, deployed, loopback, moto_endpoint)
    try:
        # streamboss-env resolved both parameters: the token from SSM is the API's.
        document = node.status(TOKEN)
        # The manager reads the groups by the stack name its user data gave it.
        groups = wait_until(
            lambda: node.status(TOKEN)["cloud"]["agent_groups"]["groups"].get(operation),
            READY, f"the agent group of {operation} in status")
    finally:
        stop(node)
    assert groups["desired"] == 2
    shown = document["connections"]
    assert shown["management"] == {"url": substitute(management, ports),
                                   "source": "STREAMBOSS_MANAGEMENT_URL", "state": "answers"}
    assert shown["broker"] == {"url": redact(substitute(broker_url, ports)),
                               "source": "STREAMBOSS_BROKER_URL", "state": "answers"}
    assert shown["archive_store"] == {"url": archive, "source": "STREAMBOSS_ARCHIVE_STORE",
                                      "state": "answers"}
    assert document["demand_observed"] is True
    # The aws dispatcher, which does not deploy (no Pulumi CLI on the node), for the stack
    # whose agent groups carry this name.
    assert document["dispatcher"] == "aws"
    assert {document["stack"]["stack"]} == deployed.group_stacks
    assert document["stack"]["state"] == "external"
    # The management API saw the manager's own user (the broker URL's), over TLS.
    assert loopback.https.relayed > 0 and loopback.amqps.relayed > 0
    log = node.log.read_text()
    assert deployed.password not in log and TOKEN not in log
    assert "management API https://localhost:" in log


def test_a_link_that_drops_the_management_url_shows_in_status(node_parts, loopback):
    """The issue's bug, made again on purpose: without STREAMBOSS_MANAGEMENT_URL the
    manager falls back beside the broker (https://HOST:15671), which Amazon MQ does not
    serve, and status says so."""
    deployed, image, moto_endpoint = node_parts
    node = start_unit(image.unit, image, deployed, loopback, moto_endpoint,
                      drop="STREAMBOSS_MANAGEMENT_URL")
    try:
        shown = node.status(TOKEN)["connections"]["management"]
    finally:
        stop(node)
    assert shown["source"] == "beside the broker URL"
    assert shown["url"] == "https://localhost:15671"
    assert shown["state"] != "answers"


def test_demand_as_deployed_reaches_cloudwatch(node_parts, loopback, names, follow):
    """The node's manager publishes Wanted from what the management API shows: 0 while
    nobody consumes the operation's output (not 1, as a manager blind to demand would),
    1 once a consumer attaches."""
    import boto3

    deployed, image, moto_endpoint = node_parts
    source, sink, operation = names("raw"), names("shout"), names("upper")
    node = start_unit(image.unit, image, deployed, loopback, moto_endpoint)
    api = httpx.Client(base_url=f"http://127.0.0.1:{node.port}/v1", timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}"})
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_endpoint, region_name=REGION,
                              aws_access_key_id="testing", aws_secret_access_key="testing")

    def wanted() -> float | None:
        now = datetime.now(UTC)
        points = cloudwatch.get_metric_statistics(
            Namespace="streamboss", MetricName="Wanted",
            Dimensions=[{"Name": "Operation", "Value": operation}],
            StartTime=now - timedelta(minutes=10), EndTime=now + timedelta(minutes=1),
            Period=600, Statistics=["Maximum"])["Datapoints"]
        return max((p["Maximum"] for p in points), default=None)

    try:
        for stream in (source, sink):
            assert api.post("/streams", json={"name": stream}).status_code == 201
        assert api.post("/definitions", json={"definition": {
            "exec": "cat", "name": operation, "timeout": 60}}).status_code == 201
        assert api.post("/operations", json={"name": operation, "definition": operation,
                                             "input": source, "output": sink}
                        ).status_code == 201
        # What `pulumi up` elsewhere needs of the node's declarations: the stack's
        # streamboss:operations, as the program parses it.
        exported = api.get("/stack-config").json()
        assert exported["key"] == "streamboss:operations"
        (spec,) = [o for o in parse_operations(json.loads(exported["value"]))
                   if o.name == operation]
        assert (spec.input, spec.output) == (source, sink)
        wait_until(lambda: wanted() is not None, READY, f"a Wanted datapoint for {operation}")
        assert wanted() == 0.0, "nobody consumes its output: unwanted"
        follow(sink)
        wait_until(lambda: wanted() == 1.0, READY, f"Wanted = 1 for {operation}")
    finally:
        with contextlib.suppress(httpx.HTTPError):
            api.delete(f"/operations/{operation}")
            for stream in (source, sink):
                api.delete(f"/streams/{stream}", params={"force": "true"})
        api.close()
        stop(node)
        forget(operation, source, sink)


def aws_group(endpoint: str, name: str, tags: dict[str, str], desired: int) -> None:
    """An autoscaling group in moto with ``tags``."""
    import boto3

    def client(service: str) -> Any:
        return boto3.client(service, endpoint_url=endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    client("ec2").create_launch_template(LaunchTemplateName=name, LaunchTemplateData={
        "ImageId": "ami-12c6146b", "InstanceType": "t3.small"})
    client("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=0, MaxSize=4, DesiredCapacity=desired,
        LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
        AvailabilityZones=[f"{REGION}a"],
        Tags=[{"Key": k, "Value": v, "PropagateAtLaunch": True} for k, v in tags.items()])


def forget(operation: str, *streams: str) -> None:
    """The operation's queues and the streams' exchanges, gone from the shared broker."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        channel = connection.channel()
        for queue in operation_queues(operation):
            channel.queue_delete(queue)
        for stream in (*streams, f"{operation}.dead"):
            channel.exchange_delete(stream_exchange(stream))
    finally:
        connection.close()
