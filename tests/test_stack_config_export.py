"""``streamboss stack-config`` (``GET /v1/stack-config``): the declarations as the stack's
``streamboss:operations``, for a ``pulumi up`` run elsewhere than the manager node, which
does not deploy. A real manager on the real broker; the program's own parser reads it."""

from __future__ import annotations

import json
from pathlib import Path

from infra.operations import parse_operations
from streamboss.manager.stack_config import CONFIG_KEY, ENV_CONFIG_KEY

from .conftest import ManagerPool

SECRET = "s3cret-value-never-shown"


def test_the_export_is_what_the_program_parses_with_env_values_masked(managers: ManagerPool,
                                                                     tmp_path: Path):
    manager = managers.start()
    source, sink, operation = (managers.name(p) for p in ("in", "out", "op"))
    manager.ok("create-stream", source)
    definition = tmp_path / "definition.json"
    definition.write_text(json.dumps({"definition": {
        "exec": "cat", "name": operation, "timeout": 60, "env": {"API_KEY": SECRET}}}))
    manager.ok("define-process", str(definition))
    manager.ok("create-operation", operation, operation, source, sink, "--max", "3")

    shown = manager.cli("stack-config")
    assert shown.returncode == 0, shown.stderr
    (spec,) = parse_operations(json.loads(shown.stdout))
    assert (spec.name, spec.input, spec.output, spec.max) == (operation, source, sink, 3)
    assert spec.definition["env"] == {"API_KEY": "<secret>"}
    assert f"{operation}: env API_KEY go in the secret {ENV_CONFIG_KEY}" in shown.stderr
    document = json.loads(manager.ok("stack-config", "-o", "json"))
    assert document["key"] == CONFIG_KEY and document["value"] == shown.stdout.strip()
    assert document["env_names"] == {operation: ["API_KEY"]}
    assert SECRET not in shown.stdout + shown.stderr + json.dumps(document)
