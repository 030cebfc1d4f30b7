"""Scale-in that drains, under Pulumi mocks: every pool's termination hook, the one extra
permission its nodes get (the two lifecycle calls on their own group), tags in the agents'
instance metadata (the handler's group name), and the handler's settings in user data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from infra.lifecycle_hook import (
    AGENT_DRAIN_TIMEOUT_SECONDS,
    AGENT_STOP_MARGIN_SECONDS,
    HEARTBEAT_TIMEOUT_SECONDS,
    HOOK_NAME,
)
from infra.user_data import LIFECYCLE_SERVICE
from streamboss.agent import lifecycle

from .conftest import assert_secure_template, plain
from .test_components import cloud_config, written
from .test_program import OPERATIONS, run_program

ROOT = Path(__file__).resolve().parents[2]
AGENT_ROLE_DEFAULTS = ROOT / "ansible/roles/stream_agent/defaults/main.yml"
# What IMDS accepts as tag keys when tags are served in metadata (else launches fail).
IMDS_TAG_KEY = re.compile(r"[A-Za-z0-9+\-=.,_:@]+")


def test_every_pool_has_a_termination_hook_that_continues_after_the_drain(stack):
    run_program(stack)
    hooks = {h.name: h.inputs for h in stack.of_type(
        "aws:autoscaling/lifecycleHook:LifecycleHook")}
    assert set(hooks) == {f"agents-{op}-drain" for op in OPERATIONS}
    for op in OPERATIONS:
        hook = hooks[f"agents-{op}-drain"]
        group = stack.named(f"agents-{op}-asg")
        assert hook["autoscalingGroupName"] == group.state["name"]
        assert hook["name"] == HOOK_NAME
        assert hook["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
        assert hook["defaultResult"] == "CONTINUE"
        assert hook["heartbeatTimeout"] == HEARTBEAT_TIMEOUT_SECONDS
        # Not both ways: a hook in the group's initial_lifecycle_hooks too would be a duplicate.
        assert "initialLifecycleHooks" not in group.inputs


def test_the_heartbeat_timeout_is_a_little_above_the_agent_units_stop_timeout():
    """The images' unit (ansible/roles/stream_agent) stops the agent within its drain
    timeout plus a margin (TimeoutStopSec); the hook must wait at least that long for a
    handler that died, but not much longer (30 to 7200 s is what AWS accepts)."""
    defaults = yaml.safe_load(AGENT_ROLE_DEFAULTS.read_text())
    assert defaults["stream_agent_drain_timeout"] == AGENT_DRAIN_TIMEOUT_SECONDS
    assert defaults["stream_agent_stop_timeout"] == (
        f"{{{{ stream_agent_drain_timeout | int + {AGENT_STOP_MARGIN_SECONDS} }}}}")
    stop = AGENT_DRAIN_TIMEOUT_SECONDS + AGENT_STOP_MARGIN_SECONDS
    assert stop < HEARTBEAT_TIMEOUT_SECONDS <= 2 * stop
    assert 30 <= HEARTBEAT_TIMEOUT_SECONDS <= 7200


def test_a_node_may_complete_and_extend_lifecycle_actions_of_its_own_group_only(stack):
    run_program(stack)
    for op in OPERATIONS:
        drain = stack.named(f"agents-{op}-drain-policy")
        # The agents' role (the profile's), not another.
        profile = stack.named(f"agents-{op}-profile")
        assert drain.inputs["role"] == profile.inputs["role"] == f"agents-{op}-role"
        (only,) = json.loads(drain.inputs["policy"])["Statement"]
        assert only["Effect"] == "Allow"
        assert only["Action"] == ["autoscaling:CompleteLifecycleAction",
                                  "autoscaling:RecordLifecycleActionHeartbeat"]
        # The group's own ARN (its output, UUID included), no pattern, no wildcard.
        assert only["Resource"] == [stack.named(f"agents-{op}-asg").state["arn"]]
        assert "*" not in json.dumps(only["Resource"])
        # The role's main policy gained nothing from autoscaling.
        main = json.loads(stack.named(f"agents-{op}-policy").inputs["policy"])
        assert not [a for s in main["Statement"] for a in s["Action"]
                    if a.startswith("autoscaling:")]
    # Nobody else may: the manager's role only describes groups.
    manager = json.loads(stack.named("manager-policy").inputs["policy"])
    assert {a for s in manager["Statement"] for a in s["Action"]
            if a.startswith("autoscaling:")} == {"autoscaling:DescribeAutoScalingGroups"}


def test_agents_serve_their_tags_in_metadata_and_every_tag_key_is_one_imds_accepts(stack):
    run_program(stack)
    for template in stack.of_type("aws:ec2/launchTemplate:LaunchTemplate"):
        assert_secure_template(template)
        options = template.inputs["metadataOptions"]
        agents = template.name.startswith("agents-")
        # Agents read their group's name there; the manager has no use for tags.
        assert options["instanceMetadataTags"] == ("enabled" if agents else "disabled")
        if agents:
            for spec in template.inputs["tagSpecifications"]:
                bad = [k for k in spec["tags"] if not IMDS_TAG_KEY.fullmatch(k)]
                assert bad == [], f"{template.name}: IMDS refuses tag keys {bad}"


def lifecycle_env(template: Any) -> dict[str, str]:
    return dict(line.split("=", 1) for line in written(template)["lifecycle.env"].splitlines())


def test_user_data_starts_the_handler_with_its_hook_and_the_handler_accepts_it(stack):
    run_program(stack)
    template = stack.named("agents-upper-lt")
    env = lifecycle_env(template)
    assert env == {lifecycle.HOOK_ENV: HOOK_NAME,
                   lifecycle.HEARTBEAT_TIMEOUT_ENV: str(HEARTBEAT_TIMEOUT_SECONDS),
                   "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}
    (entry,) = [f for f in cloud_config(template)["write_files"]
                if f["path"] == "/etc/streamboss/lifecycle.env"]
    assert (entry["owner"], entry["permissions"]) == ("root:root", "0600")
    assert cloud_config(template)["runcmd"] == [
        ["systemctl", "enable", "--now", "stream-agent.service", LIFECYCLE_SERVICE]]
    # The handler's own checks take these values; the group comes from the instance's tag.
    assert lifecycle._names(None, env[lifecycle.HOOK_ENV]) == (None, HOOK_NAME)
    # Nothing secret in it: the user data as a whole is a secret (the definition's env),
    # but lifecycle.env holds names and a number.
    assert set(env) <= {lifecycle.HOOK_ENV, lifecycle.HEARTBEAT_TIMEOUT_ENV, "AWS_REGION",
                        "AWS_DEFAULT_REGION"}
    assert plain(template.inputs["userData"])
