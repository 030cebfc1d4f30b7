"""Scale-in that drains: ``stream-agent-lifecycle`` against a stand-in IMDSv2 on loopback
and moto's autoscaling (with the two lifecycle calls moto lacks added by
tests/lifecycle_standins.py), draining a real ``stream-agent`` on the real broker.

The group, its termination hook and the instance live in moto; the stand-in IMDS serves
that instance's id, its group's name (the ``aws:autoscaling:groupName`` tag, as the
agents' launch templates serve tags in metadata) and its target lifecycle state, which
the test switches to ``Terminated`` while the agent holds messages in flight. The
handler gets only what a node's lifecycle.env holds: the hook's name and timeout. It
must SIGTERM the agent, record heartbeats while it drains, complete the action
(CONTINUE) only after it has exited, and exit 0; every message published comes out (a
second agent takes what the first left in the queue)."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from streamboss.agent.lifecycle import pid_running
from tests.conftest import MOTO_ENV, PYTHON, MotoServer, wait_until
from tests.lifecycle_standins import StandInMetadata, lifecycle_actions_in_moto

REGION = MOTO_ENV["AWS_DEFAULT_REGION"]
HOOK = "streamboss-drain"
# Bounds that keep a broken handler from hanging the suite; not speed claims.
HANDLER_EXIT_TIMEOUT = 120.0
OUTPUT_TIMEOUT = 60.0
# Each message takes this long: with a window of 4 the agent needs seconds to drain,
# many heartbeat intervals (0.3 s).
SLOW_SECONDS = 1.5
WINDOW = 4
MESSAGES = 16


def autoscaling(moto_server: MotoServer, region: str = REGION) -> Any:
    import boto3

    return boto3.client("autoscaling", endpoint_url=moto_server.endpoint, region_name=region,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def make_group(moto_server: MotoServer, region: str = REGION) -> tuple[str, str]:
    """A one-instance group with a termination hook as the pools declare it; its name and
    its instance's id."""
    client = autoscaling(moto_server, region)
    name = f"streamboss-test-{uuid.uuid4().hex[:8]}"
    client.create_launch_configuration(LaunchConfigurationName=name, ImageId="ami-12c6146b",
                                       InstanceType="t3.micro")
    client.create_auto_scaling_group(AutoScalingGroupName=name, LaunchConfigurationName=name,
                                     MinSize=1, MaxSize=1, AvailabilityZones=[f"{region}a"])
    client.put_lifecycle_hook(LifecycleHookName=HOOK, AutoScalingGroupName=name,
                              LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                              HeartbeatTimeout=60, DefaultResult="CONTINUE")
    (group,) = client.describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
        "AutoScalingGroups"]
    (instance,) = group["Instances"]
    return name, instance["InstanceId"]


def handler_env(metadata: StandInMetadata, moto_server: MotoServer,
                **extra: str) -> dict[str, str]:
    """What the node's unit gives the handler (lifecycle.env) plus the stand-ins' addresses
    and moto's credentials; nothing else of the test's environment."""
    return {"PATH": os.environ["PATH"], **MOTO_ENV, "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL_AUTO_SCALING": moto_server.endpoint,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata.endpoint,
            "STREAMBOSS_LIFECYCLE_HOOK": HOOK,
            "STREAMBOSS_LIFECYCLE_HEARTBEAT_TIMEOUT": "60", **extra}


def start_handler(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "streamboss.agent.lifecycle", "--poll-interval", "0.1", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def slow_upper(script: Any) -> str:
    return script("slow_upper", f"""
        import sys, time
        data = sys.stdin.buffer.read()
        time.sleep({SLOW_SECONDS})
        sys.stdout.buffer.write(data.upper())
        """)


@pytest.mark.parametrize("target", ["Terminated", "Warmed:Stopped"])
def test_the_handler_drains_a_real_agent_heartbeats_then_completes_and_nothing_is_lost(
        broker, streams, agent, moto_server, slow_upper, tmp_path, target: str):
    source, sink = streams("lc-in", "lc-out")
    operation = f"t-lc-{uuid.uuid4().hex[:8]}"
    capture = broker.capture(sink)
    group, instance_id = make_group(moto_server)
    options = ("--exec", slow_upper, "--mode", "per-message", "--concurrency", "1",
               "--prefetch", str(WINDOW))
    first = agent(operation, source, sink, *options)

    with StandInMetadata(instance_id, group=group) as metadata, \
            lifecycle_actions_in_moto(lambda: pid_running(first.pid)) as ledger:
        log = tmp_path / "lifecycle.log"
        handler = start_handler(handler_env(metadata, moto_server), log,
                                "--pid", str(first.pid), "--heartbeat-interval", "0.3")
        try:
            wait_until(lambda: metadata.state_reads() >= 1, 30, "the handler's first look")
            ids = broker.publish(source, [f"message {i}".encode() for i in range(MESSAGES)])
            # The first output means the agent is working through a full window.
            (early,) = capture.collect(1, timeout=OUTPUT_TIMEOUT)
            # Terminated, or back into a warm pool that reuses instances on scale-in.
            metadata.state = target
            code = handler.wait(timeout=HANDLER_EXIT_TIMEOUT)
        finally:
            if handler.poll() is None:
                handler.kill()
                handler.wait()
        text = log.read_text()
        assert code == 0, text

    # The agent drained: SIGTERM with messages in flight, all finished, exit 0.
    assert first.proc.wait(timeout=30) == 0, first.log()
    draining = re.search(r"SIGTERM received; draining (\d+) in-flight", first.log())
    assert draining and int(draining.group(1)) > 0, first.log()
    assert "drained; exiting" in first.log()

    # moto saw heartbeats while the agent still ran, then one completion after it exited.
    heartbeats, completions = ledger.of("heartbeat"), ledger.of("complete")
    assert [c.observed for c in heartbeats].count(True) >= 1, text
    (done,) = completions
    assert (done.group, done.hook, done.instance_id, done.result) == (
        group, HOOK, instance_id, "CONTINUE")
    assert done.observed is False, "completed only after the agent had exited"
    assert ledger.calls[-1] is done, "no heartbeat after the completion"
    assert "lifecycle action completed (CONTINUE)" in text
    # IMDSv2: a token first, and no request without it.
    assert metadata.token_puts >= 1 and metadata.refused == []
    # Every log line of the handler is one line (no traceback).
    assert "Traceback" not in text

    # Nothing lost: what the first agent had not taken is still queued; a second agent
    # finishes it, and every message's output arrives (a duplicate would be allowed).
    second = agent(operation, source, sink, *options)
    seen = {early.parent}
    outputs = {early.parent: early.body}

    def all_out() -> bool:
        for message in capture.collect_until_quiet(quiet=0.5, timeout=5):
            seen.add(message.parent)
            outputs[message.parent] = message.body
        return set(ids) <= seen

    wait_until(all_out, OUTPUT_TIMEOUT, f"outputs of all {len(ids)} messages", interval=0)
    assert second.terminate() == 0, second.log()
    assert seen == set(ids)
    bodies = dict(zip(ids, (f"MESSAGE {i}".encode() for i in range(MESSAGES)), strict=True))
    assert outputs == bodies


def test_without_a_hook_the_handler_says_so_in_one_line_and_exits_2(moto_server):
    with StandInMetadata("i-0123456789abcdef0") as metadata:
        env = handler_env(metadata, moto_server, STREAMBOSS_LIFECYCLE_HOOK="")
        done = subprocess.run([PYTHON, "-m", "streamboss.agent.lifecycle"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "stream-agent-lifecycle: error: no lifecycle hook: set --hook or "
        "STREAMBOSS_LIFECYCLE_HOOK"], done.stderr


def retried_errors(env: dict[str, str], log: Path, pid: int) -> list[str]:
    """Start the handler, wait for two logged metadata errors, check it still runs, stop
    it; the error lines."""
    handler = start_handler(env, log, "--pid", str(pid))
    try:
        wait_until(lambda: log.read_text().count("instance metadata:") >= 2, 60,
                   "two logged metadata errors")
        assert handler.poll() is None, log.read_text()
    finally:
        handler.kill()
        handler.wait()
    lines = [line for line in log.read_text().splitlines() if "instance metadata:" in line]
    assert all(re.search(r"WARNING .*instance metadata: .*; again in \d+s$", line)
               for line in lines), lines
    assert "Traceback" not in log.read_text()
    return lines


def test_metadata_errors_are_logged_in_one_line_and_retried_never_a_crash(
        moto_server, tmp_path):
    """No IMDS (nothing listens), then IMDS without the group's tag: the handler keeps
    trying with backoff, one line per error naming the fix; once the stand-in serves the
    tag it watches, and a terminated instance with no agent left completes at once."""
    group, instance_id = make_group(moto_server)
    # An agent that has exited already: a child of ours that ran and was reaped.
    gone = subprocess.Popen([PYTHON, "-c", "pass"])
    gone.wait()
    log = tmp_path / "lifecycle.log"
    with StandInMetadata(instance_id, state="Terminated") as metadata, \
            lifecycle_actions_in_moto(lambda: None) as ledger:
        env = handler_env(metadata, moto_server,
                          AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9")
        retried_errors(env, log, gone.pid)
        env = handler_env(metadata, moto_server)
        lines = retried_errors(env, log, gone.pid)
        assert all("no aws:autoscaling:groupName tag" in line and
                   "set --group or STREAMBOSS_LIFECYCLE_GROUP" in line for line in lines)
        assert ledger.calls == []
        # With the tag it completes for the already-drained node.
        metadata.group = group
        handler = start_handler(env, log, "--pid", str(gone.pid))
        assert handler.wait(timeout=HANDLER_EXIT_TIMEOUT) == 0, log.read_text()
    (done,) = ledger.calls
    assert (done.action, done.instance_id, done.result) == ("complete", instance_id, "CONTINUE")
