"""The README stays complete: every command and subcommand of the CLI is documented there."""

from __future__ import annotations

from pathlib import Path

import click

from safemigrate.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "safemigrate") -> list[str]:
    out = []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        out.append(path)
        if isinstance(command, click.Group):
            out += [f"{path} {sub}" for sub in sorted(command.commands)]
    return out


def _documented(path: str) -> bool:
    parts = path.split()[1:]
    rows = [line for line in README.splitlines() if line.startswith("| `safemigrate ")]
    if len(parts) == 1:  # a row of the command table: `safemigrate NAME …` or `… / `NAME` …`
        return any(f"`safemigrate {parts[0]}" in row or f"/ `{parts[0]}" in row for row in rows)
    if f"`safemigrate {' '.join(parts)}" in README:
        return True
    if len(parts) == 2:  # a subcommand named in its group's table row: `backup create\|list\|…`
        group, sub = parts
        rows = [line for line in README.splitlines() if line.startswith(f"| `safemigrate {group}")]
        if group == "degrade" and sub in {"normal", "minimal", "essential", "emergency", "maintenance"}:
            return any("degrade LEVEL" in row for row in rows)
        return any(f"|{sub}" in row or f" {sub}" in row for row in rows)
    return False


def test_every_command_is_in_the_readme() -> None:
    missing = [path for path in _commands(main) if not _documented(path)]
    assert not missing, f"commands missing from README.md: {missing}"


def test_readme_shows_the_two_setup_commands() -> None:
    assert "make demo" in README and "make test" in README
