"""The templates and playbooks as files: packer fmt and validate, ansible-lint, syntax checks."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ANSIBLE_DIR, APPLIANCE_DIR, VENV_BIN, need_packer

pytestmark = pytest.mark.appliance

TEMPLATES = ("stream-agent.pkr.hcl", "stream-manager.pkr.hcl")
PLAYBOOKS = ("site.yml", "upgrade-agents.yml", "rotate-broker-credentials.yml",
             "collect-logs.yml")
ONLY = {"stream-agent.pkr.hcl": "amazon-ebs.stream-agent",
        "stream-manager.pkr.hcl": "amazon-ebs.stream-manager"}


def packer(*args: str, env: dict[str, str], cwd: Path = APPLIANCE_DIR,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_packer(), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_templates_are_packer_fmt_clean(ansible_env):
    for path in (".", "plugins"):
        result = packer("fmt", "-check", "-diff", path, env=ansible_env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name for p in APPLIANCE_DIR.glob("*.pkr.hcl")} == {
        *TEMPLATES, "variables.pkr.hcl"}


@pytest.mark.parametrize("template", TEMPLATES)
def test_packer_1_6_validates_each_template(template, ansible_env, wheels, tmp_path):
    # Packer reads the directory (the template and the shared variables); -only picks one.
    result = packer("validate", f"-only={ONLY[template]}", f"-var=wheels={wheels}", ".",
                    env=ansible_env)
    assert result.returncode == 0, result.stdout + result.stderr
    # Packer 1.6 validates nothing for an -only name that matches no build: prove this one
    # selects the template by breaking a copy of it.
    copy = tmp_path / "appliance"
    shutil.copytree(APPLIANCE_DIR, copy, ignore=shutil.ignore_patterns("manifest*.json"))
    (tmp_path / "ansible").symlink_to(ANSIBLE_DIR)
    broken = (copy / template).read_text().replace(
        "  ena_support = true\n", "  ena_support = true\n  bogus_attr  = 1\n")
    (copy / template).write_text(broken)
    result = packer("validate", f"-only={ONLY[template]}", f"-var=wheels={wheels}", ".",
                    env=ansible_env, cwd=copy)
    assert result.returncode != 0 and "bogus_attr" in result.stdout + result.stderr
    text = (APPLIANCE_DIR / template).read_text()
    for needle in ('source "amazon-ebs"', "source_ami_filter", "encrypt_boot = true",
                   "encrypted             = true", 'provisioner "ansible"',
                   "require-imdsv2.py", 'post-processor "manifest"',
                   f'"streamboss:role" = "{template.removesuffix(".pkr.hcl")}"'):
        assert needle in text, needle


def test_validate_catches_a_missing_wheel_directory_and_unknown_variables(ansible_env):
    missing = packer("validate", ".", env=ansible_env)
    assert missing.returncode != 0 and "wheels" in missing.stdout + missing.stderr
    unknown = packer("validate", "-var=wheels=x", "-var=nosuch=1", ".", env=ansible_env)
    assert unknown.returncode != 0 and "nosuch" in unknown.stdout + unknown.stderr


def test_the_newer_packer_plugins_block_is_kept_away_from_packer_1_6(ansible_env):
    # 1.6.6 cannot read required_plugins: the block lives where directory mode never looks.
    text = (APPLIANCE_DIR / "plugins" / "plugins.pkr.hcl").read_text()
    assert "required_plugins" in text
    old = packer("validate", "-syntax-only", "plugins/plugins.pkr.hcl", env=ansible_env)
    assert old.returncode != 0 and "required_plugins" in old.stdout + old.stderr
    assert not any("required_plugins" in p.read_text() for p in APPLIANCE_DIR.glob("*.pkr.hcl"))


def test_ansible_lint_passes_with_the_production_profile_offline(ansible_env):
    result = subprocess.run([str(VENV_BIN / "ansible-lint"), "--offline"], cwd=ANSIBLE_DIR,
                            env=ansible_env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output


def test_every_playbook_passes_the_syntax_check(ansible_env):
    assert {p.name for p in ANSIBLE_DIR.glob("*.yml")} == set(PLAYBOOKS)
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "--syntax-check",
         "-i", "inventory/example/hosts.yml", *PLAYBOOKS],
        cwd=ANSIBLE_DIR, env=ansible_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_roles_and_playbooks_use_ansible_builtin_only():
    # Nothing to install from Galaxy (or anywhere) at run time: every module is ansible.builtin.
    used: set[str] = set()
    for path in ANSIBLE_DIR.rglob("*.yml"):
        used |= set(re.findall(r"^\s*-?\s*([a-z0-9_]+\.[a-z0-9_]+\.[a-z0-9_]+):", path.read_text(),
                               re.M))
    assert used and {name.rsplit(".", 1)[0] for name in used} == {"ansible.builtin"}, used
