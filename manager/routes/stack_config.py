"""``/v1/stack-config``: the declarations as the AWS stack's ``streamboss:operations``.

The manager node does not deploy (``--no-deploy``: no Pulumi CLI, no deploy
permissions), so the operator's ``pulumi up`` elsewhere must carry what was declared
on it; this is the exact value the aws dispatcher would set (``manager/stack_config.py``).
Env values stay masked here as in every other answer: they go to the secret
``streamboss:operationsEnv`` by the operator's own hand (their names are listed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from ..api_models import READ, errors
from ..stack_config import CONFIG_KEY, ENV_CONFIG_KEY, StackConfigError, stack_config
from ..store import StoreError

if TYPE_CHECKING:
    from ..api import Manager


def router(manager: Manager) -> APIRouter:
    """The stack-config route, reading ``manager``'s store."""
    routes = APIRouter(tags=["aws"])

    @routes.get("/v1/stack-config", responses=errors(*READ, 409))
    def get_stack_config() -> dict[str, Any]:
        definitions = {d.id: d for d in manager.store.definitions()}
        operations = manager.store.operations()
        try:
            config = stack_config(operations, definitions)
        except StackConfigError as exc:
            raise StoreError(str(exc), 409) from None
        env_names = {}
        for op in operations:
            env = definitions[op.definition_id].body.get("env")
            if isinstance(env, dict) and env:
                env_names[op.name] = sorted(env)
        return {"key": CONFIG_KEY, "value": config.operations, "sha256": config.digest,
                "env_key": ENV_CONFIG_KEY, "env_names": env_names}

    return routes
