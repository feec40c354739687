"""Documentation stays true: docs/*-help.txt match the CLIs, and every README command line parses."""

import importlib
import re
import shlex
import subprocess
import sys

import click
import pytest

from tests.conftest import REPO_ROOT, subprocess_env

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import help_docs  # noqa: E402


@pytest.mark.slow
def test_help_files_are_current():
    result = subprocess.run(
        [sys.executable, "scripts/help_docs.py", "--check"],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(help_docs.expected_files()) == len(help_docs.SCRIPTS)  # Every script exists and is documented.


def readme_commands():
    """Each `python X.py ...` / `torchrun ... X.py ...` command in the README's code blocks, as (module, args)."""
    text = (REPO_ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:\.?bash|sh)\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            for i, word in enumerate(words):
                if word.endswith(".py") and word[:-3] in help_docs.SCRIPTS.values():
                    commands.append((word[:-3], words[i + 1 :]))
                    break
    return commands


def test_readme_has_examples_for_every_script():
    documented = {module for module, _ in readme_commands()}
    assert documented == set(help_docs.SCRIPTS.values())


@pytest.mark.parametrize(
    "module_name,args", readme_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60]
)
def test_readme_command_parses(module_name, args):
    command = help_docs.main_command(importlib.import_module(module_name))
    try:
        ctx = command.make_context(module_name, list(args))
        if isinstance(command, click.Group):
            sub = command.get_command(ctx, args[0])
            assert sub is not None, f"unknown subcommand {args[0]}"
            sub.make_context(args[0], list(args[1:]), parent=ctx)
    except click.BadParameter as e:
        # The examples name data sets and models that do not exist on this machine; every other check must pass.
        assert "does not exist" in str(e), str(e)
