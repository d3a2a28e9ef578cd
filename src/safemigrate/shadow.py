"""The in-database shadow copy: primary key and old values of the columns a Backfill writes.

Taken before anything changes, it lets rollback restore written columns with one UPDATE in one
transaction, without touching the snapshot file.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .digest import reflect


def shadow_name(run_id: str, step_idx: int) -> str:
    return f"safemigrate_shadow_{run_id}_{step_idx}"


def create_shadow(conn: Connection, run_id: str, step_idx: int, table: str,
                  columns: list[str]) -> str:
    """Copy key + `columns` (those that exist now) of `table` into a new shadow table."""
    source = reflect(conn, table)
    pk = list(source.primary_key.columns)
    name = shadow_name(run_id, step_idx)
    shadow = sa.Table(
        name, sa.MetaData(),
        *[sa.Column(c.name, c.type, primary_key=True, autoincrement=False) for c in pk],
        *[sa.Column(source.c[c].name, source.c[c].type) for c in columns],
    )
    shadow.drop(conn, checkfirst=True)
    shadow.create(conn)
    names = [c.name for c in pk] + list(columns)
    conn.execute(shadow.insert().from_select(names, sa.select(*[source.c[n] for n in names])))
    return name


def restore_from_shadow(conn: Connection, run_id: str, step_idx: int, table: str,
                        columns: list[str]) -> int:
    """Put the old values of `columns` back for every row the shadow knows. Rows inserted
    since (not in the shadow) are left as they are."""
    if not columns:
        return 0
    target = reflect(conn, table)
    shadow = reflect(conn, shadow_name(run_id, step_idx))
    match = sa.and_(*[shadow.c[c.name] == target.c[c.name] for c in target.primary_key.columns])
    values = {
        c: sa.select(shadow.c[c]).where(match).scalar_subquery() for c in columns
    }
    result = conn.execute(
        sa.update(target).values(values).where(sa.exists(sa.select(1).select_from(shadow).where(match)))
    )
    return result.rowcount or 0


def drop_shadow(conn: Connection, run_id: str, step_idx: int) -> None:
    name = shadow_name(run_id, step_idx)
    if sa.inspect(conn).has_table(name):
        sa.Table(name, sa.MetaData()).drop(conn)


def shadow_rows(conn: Connection, table: str, name: str) -> int:
    """Rows in a shadow copy just taken, proven equal to the source's count in the same
    transaction (layer 1 of the backup, recorded in its manifest)."""
    from ._exceptions import BackupError

    def count(t: str) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar() or 0)

    copied, source = count(name), count(table)
    if copied != source:
        raise BackupError(f"shadow copy {name} holds {copied} rows, {table} has {source}")
    return copied
