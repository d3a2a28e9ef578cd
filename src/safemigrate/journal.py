"""The journal: `safemigrate_*` tables in the target database, the source of truth.

Runs, phases, step checkpoints, the append-only event log, quarantined rows, backups, applied
migrations, the run lock and shared state all live here, so `status`, control and resume work
from any process that can reach the database.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import LONGTEXT
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()
# Timestamps are DOUBLE everywhere (MySQL's FLOAT is single precision: 1.7e9 would lose
# minutes). JSON that grows with the data is LONGTEXT on MySQL, whose TEXT stops at 64 KB.
LongText = sa.Text().with_variant(LONGTEXT(), "mysql", "mariadb")

runs = sa.Table(
    "safemigrate_runs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("migration_id", sa.String(255), nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double),
    sa.Column("error", sa.Text),
    sa.Column("hostname", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("tool_version", sa.String(32)),
    sa.Column("baseline", LongText),  # JSON: pre-migration schema and digests
    sa.Column("options", sa.Text),  # JSON: batch size, workers, backup dir
)

phases = sa.Table(
    "safemigrate_phases", metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(20), primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double),
    sa.Column("error", sa.Text),
)

steps = sa.Table(
    "safemigrate_steps", metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("state", LongText),  # JSON: what revert needs
    sa.Column("checkpoint", sa.Text),  # JSON: last primary key committed
    sa.Column("rows_total", sa.BigInteger),
    sa.Column("rows_done", sa.BigInteger, nullable=False, default=0),
    sa.Column("rows_quarantined", sa.BigInteger, nullable=False, default=0),
    sa.Column("started_at", sa.Double),
    sa.Column("updated_at", sa.Double),
    sa.Column("finished_at", sa.Double),
)

events = sa.Table(
    "safemigrate_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), index=True),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("level", sa.String(10), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", LongText),
)

quarantine = sa.Table(
    "safemigrate_quarantine", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), nullable=False, index=True),
    sa.Column("step_idx", sa.Integer, nullable=False),
    sa.Column("table_name", sa.String(255), nullable=False),
    sa.Column("pk", sa.Text, nullable=False),
    sa.Column("row_data", LongText),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("ts", sa.Double, nullable=False),
)

backups = sa.Table(
    "safemigrate_backups", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("run_id", sa.String(32), index=True),
    sa.Column("kind", sa.String(20), nullable=False),  # snapshot | shadow | pre-rollback
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64)),
    sa.Column("size", sa.BigInteger),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("verified_at", sa.Double),
    sa.Column("manifest", sa.Text),
)

applied = sa.Table(
    "safemigrate_applied", metadata,
    sa.Column("migration_id", sa.String(255), primary_key=True),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)

lock = sa.Table(
    "safemigrate_lock", metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(32)),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("acquired_at", sa.Double, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
)

state = sa.Table(
    "safemigrate_state", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", LongText),
    sa.Column("updated_at", sa.Double, nullable=False),
)

requests = sa.Table(  # rollback requests: who asked, why, how urgently, and what became of it
    "safemigrate_requests", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("run_id", sa.String(32), index=True),
    sa.Column("priority", sa.String(10), nullable=False),  # low | medium | high | critical
    sa.Column("status", sa.String(20), nullable=False),  # pending|approved|executing|done|failed|rejected
    sa.Column("strategy", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("requested_by", sa.String(255), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("decided_by", sa.String(255)),
    sa.Column("decided_at", sa.Double),
    sa.Column("outcome", sa.Text),
)


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Journal:
    """Reads and writes the journal tables. Methods that take `conn` join the caller's
    transaction (so a batch and its checkpoint commit together); the others commit alone."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def ensure(self) -> None:
        """Create the journal tables when missing (idempotent)."""
        with self.engine.begin() as conn:
            metadata.create_all(conn, checkfirst=True)

    def exists(self) -> bool:
        with self.engine.connect() as conn:
            return sa.inspect(conn).has_table(runs.name)

    # -- runs ----------------------------------------------------------------------------------
    def create_run(self, conn: Connection, migration_id: str, checksum: str,
                   options: Mapping[str, Any], tool_version: str) -> str:
        run_id = new_id()
        now = time.time()
        conn.execute(runs.insert().values(
            id=run_id, migration_id=migration_id, checksum=checksum, status="running",
            phase="preparation", started_at=now, updated_at=now, hostname=socket.gethostname(),
            pid=os.getpid(), tool_version=tool_version, options=dumps(dict(options)),
        ))
        return run_id

    def update_run(self, conn: Connection | None, run_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        if "baseline" in fields and not isinstance(fields["baseline"], str):
            fields["baseline"] = dumps(fields["baseline"])
        self._write(conn, runs.update().where(runs.c.id == run_id).values(**fields))

    def run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().first()
        return None if row is None else _decode_run(row)

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        query = sa.select(runs).order_by(runs.c.started_at.desc(), runs.c.id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_decode_run(r) for r in conn.execute(query).mappings()]

    def unfinished_run(self, migration_id: str | None = None) -> dict[str, Any] | None:
        """The run left running, interrupted or half rolled back, which must be finished first."""
        query = sa.select(runs).where(runs.c.status.in_(("running", "interrupted", "rolling_back")))
        if migration_id is not None:
            query = query.where(runs.c.migration_id == migration_id)
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(runs.c.started_at.desc())).mappings().first()
        return None if row is None else _decode_run(row)

    # -- phases --------------------------------------------------------------------------------
    def phase(self, run_id: str, name: str, status: str, error: str | None = None) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            existing = conn.execute(sa.select(phases.c.status).where(
                phases.c.run_id == run_id, phases.c.name == name)).first()
            if existing is None:
                conn.execute(phases.insert().values(
                    run_id=run_id, name=name, status=status, started_at=now, error=error))
            else:
                done = now if status in ("completed", "failed", "skipped") else None
                conn.execute(phases.update().where(
                    phases.c.run_id == run_id, phases.c.name == name,
                ).values(status=status, finished_at=done, error=error))
            conn.execute(runs.update().where(runs.c.id == run_id).values(phase=name, updated_at=now))

    def phases(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(phases).where(phases.c.run_id == run_id).order_by(phases.c.started_at)
            ).mappings()
            return [dict(r) for r in rows]

    # -- steps ---------------------------------------------------------------------------------
    def init_steps(self, conn: Connection, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        now = time.time()
        for row in rows:
            conn.execute(steps.insert().values(run_id=run_id, status="pending", rows_done=0,
                                               rows_quarantined=0, updated_at=now,
                                               **row))

    def update_step(self, conn: Connection | None, run_id: str, idx: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        for key in ("state", "checkpoint"):
            if key in fields and fields[key] is not None and not isinstance(fields[key], str):
                fields[key] = dumps(fields[key])
        self._write(conn, steps.update().where(steps.c.run_id == run_id, steps.c.idx == idx)
                    .values(**fields))

    def steps(self, run_id: str, conn: Connection | None = None) -> list[dict[str, Any]]:
        query = sa.select(steps).where(steps.c.run_id == run_id).order_by(steps.c.idx)
        if conn is not None:
            return [_decode_step(r) for r in conn.execute(query).mappings()]
        with self.engine.connect() as own:
            return [_decode_step(r) for r in own.execute(query).mappings()]

    # -- events --------------------------------------------------------------------------------
    def event(self, run_id: str | None, kind: str, message: str, level: str = "info",
              data: Mapping[str, Any] | None = None, conn: Connection | None = None) -> None:
        self._write(conn, events.insert().values(
            run_id=run_id, ts=time.time(), level=level, kind=kind, message=message,
            data=dumps(dict(data)) if data else None))

    def events(self, run_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        query = sa.select(events).order_by(events.c.id)
        if run_id is not None:
            query = query.where(events.c.run_id == run_id)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["data"] = loads(row["data"])
        return rows[-limit:] if limit else rows

    # -- quarantine ----------------------------------------------------------------------------
    def quarantine_rows(self, conn: Connection, run_id: str, step_idx: int, table: str,
                        items: list[tuple[Any, Any, str]]) -> None:
        now = time.time()
        conn.execute(quarantine.insert(), [
            {"run_id": run_id, "step_idx": step_idx, "table_name": table, "pk": dumps(pk),
             "row_data": dumps(row), "error": error[:2000], "ts": now}
            for pk, row, error in items
        ])

    def unquarantine(self, conn: Connection, run_id: str, step_idx: int, keys: list[Any]) -> int:
        """Forget quarantine entries of rows that have since been migrated (the application
        fixed them and the change log brought them back)."""
        if not keys:
            return 0
        result = conn.execute(quarantine.delete().where(
            quarantine.c.run_id == run_id, quarantine.c.step_idx == step_idx,
            quarantine.c.pk.in_([dumps(list(k)) for k in keys])))
        return result.rowcount or 0

    def quarantined(self, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        query = sa.select(quarantine).where(quarantine.c.run_id == run_id).order_by(quarantine.c.id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def quarantine_count(self, run_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(quarantine)
                                    .where(quarantine.c.run_id == run_id)).scalar() or 0)

    # -- backups -------------------------------------------------------------------------------
    def record_backup(self, run_id: str | None, kind: str, location: str, *, sha256: str | None,
                      size: int | None, status: str, manifest: Mapping[str, Any] | None = None,
                      backup_id: str | None = None) -> str:
        backup_id = backup_id or new_id()
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(backups.insert().values(
                id=backup_id, run_id=run_id, kind=kind, location=location, sha256=sha256,
                size=size, status=status, created_at=now,
                verified_at=now if status == "verified" else None,
                manifest=dumps(dict(manifest)) if manifest else None))
        return backup_id

    def backups(self, run_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(backups).order_by(backups.c.created_at)
        if run_id is not None:
            query = query.where(backups.c.run_id == run_id)
        if kind is not None:
            query = query.where(backups.c.kind == kind)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["manifest"] = loads(row["manifest"])
        return rows

    # -- applied migrations --------------------------------------------------------------------
    def applied(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(applied).order_by(applied.c.migration_id)).mappings()
            return {r["migration_id"]: dict(r) for r in rows}

    def mark_applied(self, conn: Connection, migration_id: str, checksum: str, run_id: str) -> None:
        conn.execute(applied.insert().values(
            migration_id=migration_id, checksum=checksum, run_id=run_id, applied_at=time.time()))

    def unmark_applied(self, conn: Connection, migration_id: str) -> None:
        conn.execute(applied.delete().where(applied.c.migration_id == migration_id))

    # -- shared state --------------------------------------------------------------------------
    def get_state(self, key: str) -> Any:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(state.c.value).where(state.c.key == key)).scalar()
        return loads(value)

    def set_state(self, key: str, value: Any, conn: Connection | None = None) -> None:
        def write(c: Connection) -> None:
            c.execute(state.delete().where(state.c.key == key))
            c.execute(state.insert().values(key=key, value=dumps(value), updated_at=time.time()))
        if conn is not None:
            write(conn)
        else:
            with self.engine.begin() as own:
                write(own)

    # -- helpers -------------------------------------------------------------------------------
    def _write(self, conn: Connection | None, statement: sa.Executable) -> None:
        if conn is not None:
            conn.execute(statement)
        else:
            with self.engine.begin() as own:
                own.execute(statement)


def _decode_run(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["baseline"] = loads(out["baseline"])
    out["options"] = loads(out["options"]) or {}
    return out


def _decode_step(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["state"] = loads(out["state"]) or {}
    out["checkpoint"] = loads(out["checkpoint"])
    return out
