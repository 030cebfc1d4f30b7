"""A real ``packer build`` of the stream-agent template.

Inside a network namespace that has only loopback (nothing can leave it): a moto server
stands in for EC2, and an sshd stands in for the build instance. Packer finds the base
image by its filter, launches the "instance", requires IMDSv2 on it, runs the ansible
provisioner (site.yml, as a stream_agents host, installing offline from a wheelhouse)
to the end, creates the encrypted image with the tags the Pulumi program looks for,
and writes its manifest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    APPLIANCE_DIR,
    VENV_BIN,
    Node,
    SshHost,
    need_netns,
    need_packer,
    node_paths,
    start_sshd,
    stop,
    wait_port,
)

pytestmark = pytest.mark.appliance

REGION = "eu-west-1"
# moto's stand-in catalogue has Canonical's images (none named debian*).
BASE_AMI_NAME = "ubuntu/images/hvm-ssd/ubuntu-*-amd64-server-*"
BASE_AMI_OWNER = "099720109477"
BUILD_TIMEOUT = 600
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


class Namespace:
    """A network namespace with only ``lo``, and the processes started in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def close(self) -> None:
        for process in self.processes:
            stop(process)
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    need_netns()
    space = Namespace(f"sb-packer-{os.getpid()}")
    try:
        yield space
    finally:
        space.close()


def ec2_state(space: Namespace, endpoint: str) -> dict:
    """Images, instances and security groups as moto has them (asked from inside)."""
    script = textwrap.dedent(f"""
        import json, boto3
        ec2 = boto3.client("ec2", endpoint_url={endpoint!r}, region_name={REGION!r})
        images = ec2.describe_images(Owners=["self"])["Images"]
        instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
        groups = ec2.describe_security_groups()["SecurityGroups"]
        print(json.dumps({{"images": images, "instances": instances, "groups": groups}},
                         default=str))
    """)
    result = subprocess.run(space.argv(sys.executable, "-c", script), capture_output=True,
                            text=True, check=True, env={**os.environ, **AWS_ENV})
    return json.loads(result.stdout)


def test_packer_builds_the_stream_agent_image_against_moto_in_an_offline_namespace(
        converged: Node, test_host: SshHost, wheelhouse: Path, workdir: Path, ansible_env,
        namespace: Namespace, tmp_path):
    packer = need_packer()
    moto_port, ssh_port = 15000, 2222  # inside the namespace: nothing else listens there
    namespace.processes.append(subprocess.Popen(
        namespace.argv(str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    namespace.processes.append(
        start_sshd(test_host.keydir, "127.0.0.1", ssh_port, "netns", netns=namespace.name))
    wait_port("127.0.0.1", moto_port, netns=namespace.name)
    endpoint = f"http://127.0.0.1:{moto_port}"

    # The image's paths land under a prefix of their own; the packages are the ones the
    # converge installed (nothing can be downloaded in here), and there is no sudo.
    prefix = workdir / "image"
    prefix.mkdir(mode=0o755)
    extra = {**node_paths(prefix), "ansible_become": False,
             "common_apt_cache_valid_time": 0,
             "ansible_ssh_common_args": test_host.ssh_args()}
    (tmp_path / "vars.json").write_text(json.dumps(extra))
    manifest = tmp_path / "manifest.json"
    variables = {
        "wheels": str(wheelhouse), "offline": "true", "version": "0.1.0-test",
        "region": REGION, "ec2_endpoint": endpoint, "base_ami_name": BASE_AMI_NAME,
        "base_ami_owners": json.dumps([BASE_AMI_OWNER]), "root_device_name": "/dev/sda1",
        "ssh_username": "root", "ssh_host": "127.0.0.1", "ssh_port": str(ssh_port),
        "ssh_private_key_file": str(test_host.key), "python": sys.executable,
        "manifest": str(manifest),
        "ansible_extra_arguments": json.dumps(["--extra-vars", f"@{tmp_path / 'vars.json'}"]),
    }
    argv = namespace.argv(packer, "build", "-color=false", "-only=amazon-ebs.stream-agent",
                          *[f"-var={k}={v}" for k, v in variables.items()], ".")
    env = {**ansible_env, **AWS_ENV, "CHECKPOINT_DISABLE": "1",
           "PACKER_CONFIG_DIR": str(workdir / "packer"), "PACKER_LOG": "1",
           "PACKER_LOG_PATH": str(tmp_path / "packer.log")}
    build = subprocess.run(argv, cwd=APPLIANCE_DIR, env=env, capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
    output = build.stdout + build.stderr
    assert build.returncode == 0, output[-10000:]

    # The provisioner ran to the end: the play's recap, and what it installed.
    assert "IMDSv2 required (hop limit 1)" in output, output[-5000:]
    recap = [line for line in output.splitlines() if "failed=" in line and "ok=" in line]
    assert recap and all("failed=0" in line and "unreachable=0" in line
                         for line in recap), output[-5000:]
    assert (prefix / "opt/streamboss/agent/bin/stream-agent").exists()
    assert (prefix / "etc/systemd/system/stream-agent.service").exists()
    # The scale-in drain handler's unit is in the image too; user data starts it.
    assert (prefix / "etc/systemd/system/stream-agent-lifecycle.service").exists()
    assert (prefix / "opt/streamboss/agent/bin/stream-agent-lifecycle").exists()
    assert not (prefix / "etc/streamboss/agent.json").exists(), "user data writes it at boot"

    # The manifest, and the image as EC2 (moto) now has it.
    builds = json.loads(manifest.read_text())["builds"]
    assert len(builds) == 1 and builds[0]["builder_type"] == "amazon-ebs"
    assert builds[0]["custom_data"] == {"role": "stream-agent", "version": "0.1.0-test"}
    region, ami = builds[0]["artifact_id"].split(":")
    assert region == REGION and ami.startswith("ami-")
    state = ec2_state(namespace, endpoint)
    image = next(i for i in state["images"] if i["ImageId"] == ami)
    tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
    assert tags["streamboss:role"] == "stream-agent"
    assert tags["streamboss:version"] == "0.1.0-test"
    assert image["Name"].startswith("streamboss-stream-agent-0.1.0-test-")
    assert "Copying/Encrypting AMI" in output, "encrypt_boot copied the image encrypted"
    build_tag = {"Key": "Name", "Value": "packer-streamboss-stream-agent"}
    (instance,) = [i for i in state["instances"] if build_tag in i.get("Tags", [])]
    assert instance["State"]["Name"] == "terminated"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert not [g for g in state["groups"] if g["GroupName"].startswith("packer_")], \
        "the temporary security group is gone"
    # Nothing left the namespace: the only addresses Packer dialled were local.
    log = (tmp_path / "packer.log").read_text()
    assert "dial tcp" not in log.replace("dial tcp 127.0.0.1", ""), "a non-local dial"
