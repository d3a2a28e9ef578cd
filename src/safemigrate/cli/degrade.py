"""`safemigrate degrade LEVEL --reason …`, `degrade status`, `degrade off`, `degrade levels`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from .._exceptions import UsageError
from ..degrade import (
    ALL_FEATURES,
    LEVELS,
    DegradationManager,
    DegradationSettings,
    DegradationState,
    LevelConfig,
)
from . import _fail, common, handle_errors, migrator_from, out, print_json, settings_from
from .render import fmt_time

SUBCOMMANDS = ("status", "off", "levels")


class _LevelGroup(click.Group):
    """Unknown levels get the usual one-line error instead of click's usage screen."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            _fail(UsageError(f"unknown degradation level or command {name!r}",
                             "levels: " + ", ".join(LEVELS) + "; commands: " + ", ".join(SUBCOMMANDS)))
        return super().resolve_command(ctx, args)


@click.group(cls=_LevelGroup)
def degrade() -> None:
    """Degradation levels for the application: `degrade LEVEL --reason TEXT`, `status`, `off`.

    Levels: normal, minimal, essential, emergency, maintenance."""


def _manager(db: str | None, migrations: Path | None, backup_dir: Path | None
             ) -> tuple[Any, DegradationManager]:
    m = migrator_from(settings_from(db, migrations, backup_dir))
    return m, DegradationManager(m)


def _features(cfg: LevelConfig, core: tuple[str, ...] | list[str], level: str) -> str:
    if level == "maintenance":
        return "everything (503 for all routes but the health check)"
    if ALL_FEATURES in cfg.disabled_features:
        core_off = [f for f in cfg.disabled_features if f in core]
        return f"all except core ({', '.join(core) or 'none'})" + "".join(f", {f}" for f in core_off)
    return ", ".join(cfg.disabled_features) or "none"


def _limits(cfg: LevelConfig) -> str:
    parts = [(cfg.requests_per_minute, "{} requests/min per client"),
             (cfg.concurrent_connections, "{} concurrent requests per client"),
             (cfg.max_concurrent_users, "{} concurrent users"),
             (cfg.session_timeout, "session timeout {:g}s"), (cfg.cache_ttl, "cache TTL {:g}s"),
             (cfg.retry_after, "Retry-After {}s")]
    return ", ".join(text.format(value) for value, text in parts if value) or "none"


def _say(text: str) -> None:
    out.print(text, markup=False, soft_wrap=True)


def _print_state(state: DegradationState) -> None:
    style = {"normal": "green", "minimal": "yellow", "essential": "yellow"}.get(state.level, "bold red")
    out.print(f"degradation level: [{style}]{state.level}[/]", soft_wrap=True)
    if state.since is None:
        out.print("  never changed (no level in the journal)")
    else:
        _say(f"  since {fmt_time(state.since)} by {state.by} (was {state.previous})")
        _say(f"  reason: {state.reason}")
    _say(f"  disabled: {_features(state.config, state.core_features, state.level)}")
    _say(f"  limits: {_limits(state.config)}")


def _level_command(level: str) -> click.Command:
    @click.option("--reason", default=None, help="Why (journaled; required).")
    @click.option("--by", default=None, help="Who (default: user@host).")
    @common
    @handle_errors
    def command(reason: str | None, by: str | None, db: str | None, migrations: Path | None,
                backup_dir: Path | None, yes: bool) -> None:
        if not reason:
            raise UsageError(f"--reason is required to switch to {level}",
                             f"safemigrate degrade {level} --reason 'why'")
        m, manager = _manager(db, migrations, backup_dir)
        with m:
            state = manager.set_level(level, reason, by)
        _print_state(state)

    command.__doc__ = f"Switch the application to the {level} level."
    return click.command(level)(command)


for _level in LEVELS:
    degrade.add_command(_level_command(_level))


@degrade.command()
@click.option("--reason", default="back to normal", show_default=True, help="Why (journaled).")
@click.option("--by", default=None, help="Who (default: user@host).")
@common
@handle_errors
def off(reason: str, by: str | None, db: str | None, migrations: Path | None,
        backup_dir: Path | None, yes: bool) -> None:
    """Back to normal: every feature on, no limits."""
    m, manager = _manager(db, migrations, backup_dir)
    with m:
        state = manager.off(reason, by)
    _print_state(state)


@degrade.command()
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.option("--history", "history", type=click.IntRange(min=0), default=5, show_default=True,
              help="Latest level changes to show.")
@common
@handle_errors
def status(as_json: bool, history: int, db: str | None, migrations: Path | None,
           backup_dir: Path | None, yes: bool) -> None:
    """The level in force, who set it, why, and what it disables and limits."""
    m, manager = _manager(db, migrations, backup_dir)
    with m:
        state = manager.status()
        changes = manager.history(history) if history else []
    if as_json:
        print_json({**state.as_dict(), "limits": state.limits(), "history": changes})
        return
    _print_state(state)
    if changes:
        out.print("recent changes:")
        for e in changes:
            _say(f"  {fmt_time(e['ts'])} {e['message']}")


@degrade.command()
@click.option("--json", "as_json", is_flag=True, help="Print the levels as JSON.")
@common
@handle_errors
def levels(as_json: bool, db: str | None, migrations: Path | None, backup_dir: Path | None,
           yes: bool) -> None:
    """Every level as configured: the seed's defaults plus [degradation] overrides."""
    settings = settings_from(db, migrations, backup_dir)
    config = DegradationSettings.from_settings(settings)
    resolved = config.resolve()
    if as_json:
        print_json({"core_features": config.core_features,
                    "levels": {name: cfg.as_dict() for name, cfg in resolved.items()}})
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("level", "disabled features", "limits"):
        table.add_column(col, overflow="fold")
    for name, cfg in resolved.items():
        table.add_row(name, _features(cfg, config.core_features, name), _limits(cfg))
    out.print(table)
