"""The `--help` texts of every command-line script, as kept in docs/*-help.txt.

    python scripts/help_docs.py          # rewrite docs/*-help.txt
    python scripts/help_docs.py --check  # exit 1 if any file is out of date

tests/test_docs.py runs the check, so a changed option without updated docs fails the suite.
"""

import importlib
import sys
from pathlib import Path

import click

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"

# docs file stem -> script module (the seed README links docs/train-help.txt and docs/phema-help.txt).
SCRIPTS = {
    "train": "train_edm2",
    "generate": "generate_images",
    "metrics": "calculate_metrics",
    "phema": "reconstruct_phema",
    "dataset-tool": "dataset_tool",
    "count-flops": "count_flops",
    "toy-example": "toy_example",
}


def main_command(module) -> click.Command:
    """The script's top-level click command: its group if it has one, else its only command."""
    commands = [obj for obj in vars(module).values() if isinstance(obj, click.Command)]
    groups = [c for c in commands if isinstance(c, click.Group)]
    if groups:
        return groups[0]
    assert len(commands) == 1, f"{module.__name__}: expected one click command, found {len(commands)}"
    return commands[0]


def help_text(module_name: str) -> str:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    command = main_command(importlib.import_module(module_name))
    ctx = click.Context(command, info_name=f"python {module_name}.py", terminal_width=100, max_content_width=100)
    parts = [command.get_help(ctx)]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            sub_ctx = click.Context(sub, info_name=name, parent=ctx, terminal_width=100, max_content_width=100)
            parts.append(f"\n\n{'=' * 100}\n{sub.get_help(sub_ctx)}")
    return "".join(parts).rstrip() + "\n"


def expected_files() -> dict:
    return {
        DOCS / f"{stem}-help.txt": help_text(module)
        for stem, module in SCRIPTS.items()
        if (REPO_ROOT / f"{module}.py").exists()
    }


def main(argv) -> int:
    stale = []
    for path, text in expected_files().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if "--check" not in argv:
                path.parent.mkdir(exist_ok=True)
                path.write_text(text)
    if "--check" in argv and stale:
        print("out of date (run python scripts/help_docs.py):", ", ".join(p.name for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
