"""`safemigrate backup create|list|verify|restore|prune`: thin commands over safemigrate.backups."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from .. import backups as lib
from .._exceptions import BackupError, UsageError
from ..events import EventBus
from . import common, confirm, err, handle_errors, migrator_from, out, print_json, settings_from
from .render import backups_table, fmt_bytes, fmt_seconds, fmt_time


def _warn(kind: str, message: str, level: str) -> None:
    err.print(f"warning: {message}", style="yellow", markup=False, soft_wrap=True)


@click.group()
def backup() -> None:
    """Multi-layer verified backups: create, list, verify, restore, prune.

    Layers: the in-database shadow copy (runs), a snapshot file in the backup folder
    (`[backup] compress = "zstd"` optional) and an off-site copy at any fsspec URL
    (`[backup] offsite = "s3://bucket/path"`), each with its checksum in a JSON manifest."""


@backup.command("create")
@click.option("--label", default="manual", show_default=True, help="Word in the file name.")
@click.option("--json", "as_json", is_flag=True, help="Print the backup as JSON.")
@common
@handle_errors
def create(label: str, as_json: bool, db: str | None, migrations: Path | None,
           backup_dir: Path | None, yes: bool) -> None:
    """Take a manual, verified backup of every user table (journaled as kind "manual")."""
    with migrator_from(settings_from(db, migrations, backup_dir), EventBus()) as m:
        snapshot = lib.create_backup(m, label=label, notify=_warn)
    if as_json:
        print_json({"id": snapshot.id, "path": str(snapshot.path), "sha256": snapshot.sha256,
                    "size": snapshot.size, "compression": snapshot.compression,
                    "layers": snapshot.layers, "tables": sorted(snapshot.digests)})
        return
    layers = ", ".join(f"{la['layer']} {la['status']}" for la in snapshot.layers)
    out.print(f"[bold green]backup {snapshot.id}[/] verified: {escape(str(snapshot.path))} "
              f"({fmt_bytes(snapshot.size)}, sha256 {snapshot.sha256[:12]}; {layers})")


@backup.command("list")
@click.option("--all", "include_pruned", is_flag=True, help="Include pruned backups.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@common
@handle_errors
def list_(include_pruned: bool, as_json: bool, db: str | None, migrations: Path | None,
          backup_dir: Path | None, yes: bool) -> None:
    """The backups in the journal, newest first, with their layers."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        found = [b.as_dict() for b in lib.list_backups(m, include_pruned=include_pruned)]
    if as_json:
        print_json(found)
    elif not found:
        out.print("no backups yet")
    else:
        out.print(backups_table(found))


@backup.command("verify")
@click.argument("backup_id")
@click.option("--quick", is_flag=True, help="Checksums and integrity only, not the table digests.")
@click.option("--repair", is_flag=True,
              help="Replace a bad snapshot layer by the verified off-site copy.")
@click.option("--json", "as_json", is_flag=True, help="Print the layers as JSON.")
@common
@handle_errors
def verify(backup_id: str, quick: bool, repair: bool, as_json: bool, db: str | None,
           migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Re-check every layer of a backup against its manifest; exit 1 naming a bad layer."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        results = lib.verify_backup(m, backup_id, full=not quick, repair=repair)
    bad = [r for r in results if r.status == "failed"]
    if as_json:
        print_json({"ok": not bad, "layers": [r.as_dict() for r in results]})
    else:
        table = Table(title=f"backup {backup_id}", title_justify="left")
        for col in ("layer", "location", "result", "details"):
            table.add_column(col, overflow="fold")
        for r in results:
            style = {"verified": "green", "released": "dim"}.get(r.status, "bold red")
            table.add_row(r.layer, escape(r.location), f"[{style}]{r.status}[/]", escape(r.details))
        out.print(table)
    if bad:
        raise BackupError(bad[0].details, bad[0].error_hint or None)


@backup.command("restore")
@click.argument("backup_id")
@click.option("--to", "to", type=click.Path(path_type=Path), default=None,
              help="Restore into this new SQLite file (never overwritten).")
@click.option("--in-place", is_flag=True,
              help="Restore the database itself (the current state is backed up first).")
@click.option("--from", "source", type=click.Choice(["snapshot", "offsite"]), default="snapshot",
              show_default=True, help="Which layer to restore from.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common
@handle_errors
def restore(backup_id: str, to: Path | None, in_place: bool, source: str, as_json: bool,
            db: str | None, migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Restore a backup into a new file (--to) or in place (--in-place); proven by digests."""
    if (to is None) == (not in_place):
        raise UsageError("say where to restore: --to FILE (a new SQLite file) or --in-place",
                         "e.g. safemigrate backup restore ID --to restored.db")
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        if in_place:
            confirm(f"Replace the tables of {m.display_url} by backup {backup_id}?", yes)
        result = lib.restore_backup(m, backup_id, to=to, in_place=in_place, source=source,
                                    notify=_warn)
    if as_json:
        print_json(result.as_dict())
        return
    saved = f"; the state before is in backup {result.pre_restore_backup}" \
        if result.pre_restore_backup else ""
    out.print(f"[bold green]restored[/] backup {result.backup_id} ({result.source} layer) into "
              f"{escape(result.target)}: {len(result.tables)} tables, content digests equal, "
              f"{fmt_seconds(result.seconds)}{saved}")


@backup.command("prune")
@click.option("--keep", type=click.IntRange(min=0), default=None,
              help="Keep the N newest prunable backups.")
@click.option("--older-than", "older_than", default=None, metavar="AGE",
              help="Prune only backups older than AGE (7d, 12h, 30m, 2w).")
@click.option("--dry-run", is_flag=True, help="Show what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@common
@handle_errors
def prune(keep: int | None, older_than: str | None, dry_run: bool, as_json: bool, db: str | None,
          migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Delete old backups. Never those of a run that is not completed (running, interrupted,
    failed, rolled back: resume, rollback and its audit need them). A completed run's snapshot
    (what `rollback --strategy restore` needs) goes only when --keep counts it out; manual and
    pre-restore backups go when beyond --keep N and/or older than --older-than."""
    age = lib.parse_age(older_than) if older_than is not None else None
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        if not dry_run:
            preview = lib.prune_backups(m, keep=keep, older_than=age, dry_run=True)
            if preview.pruned:
                confirm(f"Delete {len(preview.pruned)} backups?", yes)
        result = lib.prune_backups(m, keep=keep, older_than=age, dry_run=dry_run)
    if as_json:
        print_json(result.as_dict())
        return
    verb = "would prune" if dry_run else "pruned"
    for b in result.pruned:
        out.print(f"{verb} {b.id} ({b.kind}, {fmt_time(b.created_at)}, {fmt_bytes(b.size)})")
    for b, why in result.kept:
        out.print(f"[dim]kept {b.id} ({b.kind}): {escape(why)}[/]")
    if not result.pruned:
        out.print("nothing to prune")
