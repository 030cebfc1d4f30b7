"""Scale-in as deployed, as far as this machine can take it: the Pulumi program's agent user
data writes lifecycle.env; the converged node's stream-agent-lifecycle.service runs its own
command with that environment (as root with no capabilities, as the unit says); the handler
watches a stand-in IMDSv2, asks "systemd" to stop stream-agent.service, and completes the
group's hook in moto once the agent, started from its own unit's command, has drained.

systemd is not PID 1 here: a stand-in ``systemctl`` first on the handler's PATH records the
request and a thread of the test plays PID 1 (SIGTERM to the unit's main process, as
KillMode=mixed does; ActiveState from that process)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from infra.lifecycle_hook import HEARTBEAT_TIMEOUT_SECONDS, HOOK_NAME
from infra.user_data import agent_user_data
from tests.conftest import MOTO_ENV, wait_until
from tests.lifecycle_standins import StandInMetadata, lifecycle_actions_in_moto
from tests.test_lifecycle_drain import make_group

from .conftest import SYSTEMD_PATH, Node, read_unit, start_as_unit, terminate

pytestmark = pytest.mark.appliance

REGION = "eu-west-1"
HANDLER_EXIT_TIMEOUT = 120.0
MESSAGES = 200

STAND_IN_SYSTEMCTL = """\
#!/bin/sh
# systemctl's stand-in: "stop" is handed to the test (PID 1's stand-in); "show" answers
# the ActiveState it keeps.
case "$1" in
  stop) echo "$*" >> {requests}; exit 0 ;;
  show) cat {state}; exit 0 ;;
esac
echo "unexpected: $*" >&2
exit 1
"""


class StandInSystemd(threading.Thread):
    """Stops the agent's "unit" when the stand-in systemctl asks: SIGTERM to its main
    process, ActiveState deactivating until it has exited, then inactive."""

    def __init__(self, directory: Path, agent: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.requests = directory / "requests"
        self.state = directory / "state"
        self.agent = agent
        self.code: int | None = None
        self.done = threading.Event()
        self.requests.write_text("")
        self.state.write_text("active\n")
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        script = bin_dir / "systemctl"
        script.write_text(STAND_IN_SYSTEMCTL.format(requests=self.requests, state=self.state))
        script.chmod(0o755)
        self.path = f"{bin_dir}:{SYSTEMD_PATH}"

    def run(self) -> None:
        while not self.done.is_set() and not self.requests.read_text().strip():
            self.done.wait(0.05)
        if self.done.is_set():
            return
        self.state.write_text("deactivating\n")
        self.agent.send_signal(signal.SIGTERM)
        self.code = self.agent.wait()
        self.state.write_text("inactive\n")


def agent_consuming(log: Path, agent: subprocess.Popen[bytes]) -> bool:
    if agent.poll() is not None:
        raise AssertionError(f"the agent exited {agent.returncode}: {log.read_text()}")
    return ": consuming " in log.read_text()


def test_the_lifecycle_unit_drains_the_agent_unit_with_the_user_datas_settings(
        converged: Node, broker, moto_server, tmp_path):
    group, instance_id = make_group(moto_server, REGION)
    cloud_config = agent_user_data(
        operation=converged.operation, input_stream=converged.input,
        output_stream=converged.output, definition={"exec": "tr a-z A-Z"},
        object_store="s3://objects/operations", broker_url_parameter="/streamboss/t/broker-url",
        region=REGION, lifecycle_hook=HOOK_NAME, heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS)
    (entry,) = [f for f in json.loads(cloud_config.split("\n", 1)[1])["write_files"]
                if f["path"].endswith("/lifecycle.env")]
    settings = converged.config_dir / "lifecycle.env"
    settings.write_text(entry["content"])  # as cloud-init would: root's, 0600
    settings.chmod(int(entry["permissions"], 8))
    try:
        broker.create_stream(converged.input)
        broker.create_stream(converged.output)
        broker.forget_operation(converged.operation)
        capture = broker.capture(converged.output)
        agent_unit = read_unit(converged.unit)
        agent = start_as_unit(agent_unit, tmp_path / "agent.log")
        systemd = StandInSystemd(tmp_path, agent)
        systemd.start()
        unit = read_unit(converged.lifecycle_unit)
        assert unit.user == "root"
        with StandInMetadata(instance_id, group=group) as metadata, \
                lifecycle_actions_in_moto(lambda: agent.poll() is None) as ledger:
            # Only what the node would not have: the stand-ins' addresses, moto's keys.
            extra = {"PATH": systemd.path, "AWS_ACCESS_KEY_ID": MOTO_ENV["AWS_ACCESS_KEY_ID"],
                     "AWS_SECRET_ACCESS_KEY": MOTO_ENV["AWS_SECRET_ACCESS_KEY"],
                     "AWS_ENDPOINT_URL_AUTO_SCALING": moto_server.endpoint,
                     "AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata.endpoint}
            log = tmp_path / "lifecycle.log"
            handler = start_as_unit(unit, log, extra)
            try:
                wait_until(lambda: metadata.state_reads() >= 1, 60, "the handler's first look")
                wait_until(lambda: agent_consuming(tmp_path / "agent.log", agent), 60,
                           "the agent consuming")
                ids = broker.publish(converged.input,
                                     [f"line {i}".encode() for i in range(MESSAGES)])
                metadata.state = "Terminated"
                code = handler.wait(timeout=HANDLER_EXIT_TIMEOUT)
            finally:
                systemd.done.set()
                if handler.poll() is None:
                    terminate(handler)
                if agent.poll() is None:
                    terminate(agent)
                systemd.join(30)
            text = log.read_text()
            assert code == 0, text
    finally:
        settings.unlink()

    # The unit's settings came from lifecycle.env (hook, timeout, region) and its own
    # Environment= (which unit to stop); the group from the instance's tag.
    assert systemd.requests.read_text().split() == [
        "stop", "--no-block", "--", converged.unit.name], text
    assert f"hook {HOOK_NAME}" in text and f"its autoscaling group: {group}" in text
    assert systemd.code == 0, (tmp_path / "agent.log").read_text()
    assert "drained; exiting" in (tmp_path / "agent.log").read_text()
    (done,) = ledger.of("complete")
    assert (done.group, done.hook, done.instance_id, done.result) == (
        group, HOOK_NAME, instance_id, "CONTINUE")
    assert done.observed is False, "completed after the agent had exited"
    assert metadata.refused == []

    # Nothing lost: the agent's unit started again finishes what it left in the queue.
    again = start_as_unit(agent_unit, tmp_path / "agent-again.log")
    try:
        outputs: dict[str, bytes] = {}

        def all_out() -> bool:
            for message in capture.collect_until_quiet(quiet=0.5, timeout=5):
                outputs[message.parent] = message.body
            return set(ids) <= set(outputs)

        wait_until(all_out, 60, f"outputs of all {len(ids)} messages", interval=0)
    finally:
        assert terminate(again) == 0
    assert outputs == {ident: f"LINE {i}".encode() for i, ident in enumerate(ids)}
