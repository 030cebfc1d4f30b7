"""User data for the nodes: cloud-config that writes the node's settings and starts its service.

The images (appliance/, provisioned by the ansible roles) carry the programs and
systemd units; user data only says *what* this node runs. The broker URL and
the manager's API token are named by their SSM parameter, and the unit reads
them at start with the node's own role; the one secret user data holds is an
operation's env values (the Pulumi program passes it as a secret). Every file
is 0600: the environment files root's (systemd reads them as PID 1),
``agent.json`` the agent's user's (the agent reads it; its programs, running
as the child user, cannot).

The contract with the images' units:

- agents: ``/etc/streamboss/agent.json`` is a ``stream-agent --config`` file
  (operation, definition, object store); ``/etc/streamboss/agent.env`` names the
  SSM parameter holding ``STREAMBOSS_BROKER_URL`` and the region;
  ``stream-agent.service`` is enabled and started. With a lifecycle hook,
  ``/etc/streamboss/lifecycle.env`` names the group's termination hook and its
  heartbeat timeout (the group's name the handler reads from the instance's
  ``aws:autoscaling:groupName`` tag in IMDS) and ``stream-agent-lifecycle.service``
  is started too: it drains the agent before the group terminates the node.
- manager: ``/etc/streamboss/manager.env`` names both SSM parameters, the
  management API, the archive and object stores, the API port, the state
  volume's device, and the aws dispatcher without deploying (the stack whose
  agent groups it reads and publishes the scaling metrics for; ``pulumi up``
  runs elsewhere); ``stream-manager.service`` is enabled and started.

Pure text (no Pulumi): the output is byte-stable for the same inputs, so an
unchanged operation never gets a new launch template version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

CONFIG_DIR = "/etc/streamboss"
# The user the stream-agent unit runs as (ansible/roles/stream_agent, stream_agent_user).
AGENT_OWNER = "streamboss:streamboss"
ROOT_OWNER = "root:root"
FILE_MODE = "0600"
AGENT_SERVICE = "stream-agent.service"
MANAGER_SERVICE = "stream-manager.service"
# Drains the agent when the node's group terminates it (agent/lifecycle.py).
LIFECYCLE_SERVICE = "stream-agent-lifecycle.service"
# The environment names the units read (systemd EnvironmentFile=).
BROKER_URL_PARAMETER_ENV = "STREAMBOSS_BROKER_URL_PARAMETER"
TOKEN_PARAMETER_ENV = "STREAMBOSS_TOKEN_PARAMETER"
# `streamboss manager` reads these (manager/cli.py): on a node it publishes the
# metrics the pools scale on and reads their groups, and never runs `pulumi up`.
DISPATCHER_ENV = "STREAMBOSS_DISPATCHER"
STACK_ENV = "STREAMBOSS_STACK"
DEPLOY_ENV = "STREAMBOSS_DEPLOY"


def agent_user_data(*, operation: str, input_stream: str, output_stream: str,
                    definition: Mapping[str, Any], object_store: str,
                    broker_url_parameter: str, region: str,
                    object_allow: Sequence[str] = (), lifecycle_hook: str | None = None,
                    heartbeat_timeout: int | None = None) -> str:
    """Cloud-config for one agent of ``operation``.

    Parameters:
        operation: the operation's name.
        input_stream: the stream it consumes.
        output_stream: the stream it publishes to.
        definition: the process definition object (exec, mode, ...).
        object_store: where large outputs go (``s3://bucket/prefix``).
        broker_url_parameter: the SSM parameter holding the broker URL.
        region: the AWS region, for the SSM and S3 clients.
        object_allow: more prefixes its object references may point into
            (``s3://bucket/prefix``), beside ``object_store``.
        lifecycle_hook: the group's termination hook; None: no lifecycle handler.
        heartbeat_timeout: that hook's heartbeat timeout in seconds.
    """
    config: dict[str, Any] = {
        "operation": {"name": operation, "input": input_stream, "output": output_stream},
        "definition": dict(definition), "object_store": object_store}
    if object_allow:
        config["object_allow"] = list(object_allow)
    env = {BROKER_URL_PARAMETER_ENV: broker_url_parameter, "AWS_REGION": region,
           "AWS_DEFAULT_REGION": region}
    files = {"agent.json": (_json(config) + "\n", AGENT_OWNER),
             "agent.env": (_env(env), ROOT_OWNER)}
    services = [AGENT_SERVICE]
    if lifecycle_hook is not None:
        from streamboss.agent.lifecycle import HEARTBEAT_TIMEOUT_ENV, HOOK_ENV

        lifecycle = {HOOK_ENV: lifecycle_hook, "AWS_REGION": region,
                     "AWS_DEFAULT_REGION": region}
        if heartbeat_timeout is not None:
            lifecycle[HEARTBEAT_TIMEOUT_ENV] = str(heartbeat_timeout)
        files["lifecycle.env"] = (_env(lifecycle), ROOT_OWNER)
        services.append(LIFECYCLE_SERVICE)
    return _cloud_config(files, *services)


def manager_user_data(*, broker_url_parameter: str, token_parameter: str, management_url: str,
                      archive_store: str, object_store: str, api_port: int, state_device: str,
                      region: str, stack: str) -> str:
    """Cloud-config for the manager node.

    Parameters:
        broker_url_parameter: the SSM parameter holding the broker URL.
        token_parameter: the SSM parameter holding the API's bearer token.
        management_url: the broker's management API (``https://host``).
        archive_store: where archives go (``s3://bucket``).
        object_store: where ``stream-file`` uploads go (``s3://bucket/prefix``).
        api_port: the port the API listens on (all interfaces, token required).
        state_device: the device of the encrypted volume that holds the state directory.
        region: the AWS region.
        stack: the stack's name, the ``streamboss:stack`` tag of its agent groups.
    """
    env = {
        BROKER_URL_PARAMETER_ENV: broker_url_parameter,
        TOKEN_PARAMETER_ENV: token_parameter,
        "STREAMBOSS_MANAGEMENT_URL": management_url,
        "STREAMBOSS_ARCHIVE_STORE": archive_store,
        "STREAMBOSS_OBJECT_STORE": object_store,
        "STREAMBOSS_API_PORT": str(api_port),
        "STREAMBOSS_STATE_DEVICE": state_device,
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        DISPATCHER_ENV: "aws",
        STACK_ENV: stack,
        DEPLOY_ENV: "false",
    }
    return _cloud_config({"manager.env": (_env(env), ROOT_OWNER)}, MANAGER_SERVICE)


def _cloud_config(files: Mapping[str, tuple[str, str]], *services: str) -> str:
    # JSON is YAML, so cloud-init reads it; json.dumps quotes every string safely.
    document = {
        "write_files": [{"path": f"{CONFIG_DIR}/{name}", "content": content,
                         "owner": owner, "permissions": FILE_MODE}
                        for name, (content, owner) in sorted(files.items())],
        "runcmd": [["systemctl", "enable", "--now", *services]],
    }
    return "#cloud-config\n" + _json(document) + "\n"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _env(values: Mapping[str, str]) -> str:
    lines = []
    for key, value in sorted(values.items()):
        # systemd would split or unquote these; none of our values needs them.
        if any(c in value for c in "\n\"'\\ $"):
            raise ValueError(f"{key} value {value!r} cannot go into an environment file")
        lines.append(f"{key}={value}\n")
    return "".join(lines)
