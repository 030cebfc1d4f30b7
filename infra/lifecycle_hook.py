"""Scale-in that drains: each pool's termination lifecycle hook and the IAM its nodes need.

An instance the group chooses to terminate (scale-in, idle to zero, an instance
refresh) waits in ``Terminating:Wait`` until its ``stream-agent-lifecycle``
handler (``agent/lifecycle.py``) has stopped the agent (SIGTERM: it finishes
its in-flight messages and exits 0) and completes the action, or until the
hook's heartbeat timeout passes with no heartbeat. The default result is
``CONTINUE``: a node whose handler is gone is still terminated, one timeout later.

The hook is its own ``aws.autoscaling.LifecycleHook`` rather than the group's
``initial_lifecycle_hooks``: the provider applies those only when it creates a
group, so a stack made before this change would never get them, and a
termination hook applies when an instance terminates, whenever it was launched.

IAM: the node's role may call ``CompleteLifecycleAction`` and
``RecordLifecycleActionHeartbeat`` on its own group's ARN and nothing else. The
ARN (which holds a UUID) is the group's own output, so the statement is a
separate role policy declared once the group exists, not a name pattern.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from .iam import policy_document, statement

# One hook per group, so the name need not be unique beyond it.
HOOK_NAME = "streamboss-drain"
TRANSITION = "autoscaling:EC2_INSTANCE_TERMINATING"
DEFAULT_RESULT = "CONTINUE"
# The stream_agent role's defaults (ansible/roles/stream_agent/defaults/main.yml): the
# agent's --drain-timeout, and the margin systemd adds before SIGKILL (TimeoutStopSec).
AGENT_DRAIN_TIMEOUT_SECONDS = 30
AGENT_STOP_MARGIN_SECONDS = 15
# Time for the handler to notice the state (it polls every 5 s) and complete.
HANDLER_MARGIN_SECONDS = 15
# With no heartbeat for this long the hook's default result ends the wait: a little
# more than the longest the agent's unit may take to stop. The handler heartbeats
# three times per timeout while the agent still runs.
HEARTBEAT_TIMEOUT_SECONDS = (AGENT_DRAIN_TIMEOUT_SECONDS + AGENT_STOP_MARGIN_SECONDS
                             + HANDLER_MARGIN_SECONDS)
LIFECYCLE_ACTIONS = ("autoscaling:CompleteLifecycleAction",
                     "autoscaling:RecordLifecycleActionHeartbeat")


def lifecycle_policy(group_arn: str) -> str:
    """The policy letting a node complete and extend lifecycle actions of its group only."""
    return policy_document([statement("DrainOwnGroup", LIFECYCLE_ACTIONS, [group_arn])])


def drain_hook(name: str, group: aws.autoscaling.Group, role_name: pulumi.Input[str],
               parent: pulumi.Resource) -> aws.autoscaling.LifecycleHook:
    """The termination hook on ``group`` and the policy letting its nodes' role (by name)
    complete it.

    Parameters:
        name: the pool's logical name (resources ``<name>-drain`` and ``<name>-drain-policy``).
        group: the pool's autoscaling group.
        role_name: the agents' role.
        parent: the pool component.
    """
    child = pulumi.ResourceOptions(parent=parent)
    aws.iam.RolePolicy(f"{name}-drain-policy", role=role_name,
                       policy=group.arn.apply(lifecycle_policy), opts=child)
    return aws.autoscaling.LifecycleHook(
        f"{name}-drain",
        name=HOOK_NAME,
        autoscaling_group_name=group.name,
        lifecycle_transition=TRANSITION,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS,
        default_result=DEFAULT_RESULT,
        opts=child,
    )
