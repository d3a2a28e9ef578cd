"""Content digests: per-column SHA-256 over a table in primary-key order.

One streaming pass gives a digest per column, so the same scan proves a snapshot equal to its
source, proves the columns a migration did not declare untouched (invariant 4), and proves a
rollback returned the original content.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from collections.abc import Iterator
from itertools import zip_longest
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

CHUNK = 4096


class StoredValue(sa.types.UserDefinedType):  # type: ignore[type-arg]
    """A SQLite column's declared type for DDL; its values read and written exactly as stored.

    SQLite keeps whatever an application put in a column: text in a DATETIME or NUMERIC column,
    JSON in a `JSONB_CUSTOM` one. SQLAlchemy's conversions for the declared type would fail on
    such values (or round NUMERIC ones to ten decimals and hide changes from the digests)."""

    cache_ok = True

    def __init__(self, declared: str = "") -> None:
        self.declared = declared

    def get_col_spec(self, **kw: Any) -> str:
        return self.declared


def _stored_values(inspector: Any, table: sa.Table, column: dict[str, Any]) -> None:
    """Column types that convert values (dates, NUMERIC, REAL, BOOLEAN, JSON) or have no name
    become StoredValue; INTEGER, TEXT and BLOB columns pass values through already."""
    dialect, declared = inspector.dialect, column["type"]
    if dialect.name != "sqlite":
        return
    if isinstance(declared, sa.types.NullType):
        column["type"] = StoredValue("")
    else:
        impl = declared.dialect_impl(dialect)
        if impl.result_processor(dialect, None) or impl.bind_processor(dialect):
            column["type"] = StoredValue(declared.compile(dialect=dialect))


def reflect(conn: Connection, table: str) -> sa.Table:
    """Reflect a table; unknown column types (custom SQLite types) are fine for reading, and
    SQLite values come back exactly as stored (see StoredValue)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        return sa.Table(table, sa.MetaData(), autoload_with=conn, resolve_fks=False,
                        listeners=[("column_reflect", _stored_values)])


def order_columns(table: sa.Table) -> list[sa.Column]:
    """Primary key order, or every column for a table without one (still deterministic)."""
    pk = list(table.primary_key.columns)
    return pk or list(table.columns)


def table_digest(conn: Connection, table: str, columns: list[str] | None = None,
                 skip_keys: set[tuple[Any, ...]] | None = None) -> dict[str, Any]:
    """{"rows": n, "columns": {name: sha256}} for the given (default: all) columns, leaving
    out the rows whose primary key is in `skip_keys` (rows the application changed)."""
    t = reflect(conn, table)
    names = columns if columns is not None else [c.name for c in t.columns]
    hashers = {name: hashlib.sha256() for name in names}
    rows = 0
    keys = [c.name for c in t.primary_key.columns] if skip_keys else []
    query = sa.select(*[t.c[n] for n in names], *[t.c[k].label(f"__key_{k}") for k in keys])
    query = query.order_by(*order_columns(t))
    result = conn.execution_options(stream_results=True).execute(query)
    width = len(names)
    while chunk := result.fetchmany(CHUNK):
        if keys:
            chunk = [r[:width] for r in chunk if tuple(r[width:]) not in skip_keys]  # type: ignore[operator]
            if not chunk:
                continue
        rows += len(chunk)
        for name, values in zip(names, zip(*chunk, strict=True), strict=True):
            hashers[name].update(_encode(values))
    return {"rows": rows, "columns": {n: h.hexdigest() for n, h in hashers.items()}}


def _encode(values: tuple[Any, ...]) -> bytes:
    """Deterministic bytes for a column chunk: pickle without its memo (so two equal values
    always encode the same, whatever their object identity), faster than repr()."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.fast = True
    pickler.dump(values)
    return buffer.getvalue()


def database_digest(conn: Connection, tables: list[str]) -> dict[str, dict[str, Any]]:
    return {table: table_digest(conn, table) for table in sorted(tables)}


def diff_digests(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences between two table digests (empty when equal)."""
    problems = []
    if before["rows"] != after["rows"]:
        problems.append(f"row count {before['rows']} -> {after['rows']}")
    for column, digest in before["columns"].items():
        other = after["columns"].get(column)
        if other is None:
            problems.append(f"column {column} is missing")
        elif other != digest:
            problems.append(f"column {column} changed")
    for column in after["columns"]:
        if column not in before["columns"]:
            problems.append(f"column {column} was added")
    return problems


def row_differences(live: Connection, snap: Connection, table: str
                    ) -> Iterator[tuple[tuple[Any, ...], str, set[str]]]:
    """Rows of `table` that differ between two databases: (key, "added"|"deleted"|"changed",
    differing columns). Both sides stream in primary-key order; rows wait only until their
    twin arrives, so memory grows with the differences, not with the table."""
    t_live, t_snap = reflect(live, table), reflect(snap, table)
    names = [c.name for c in t_snap.columns if c.name in t_live.c]
    keys = [c.name for c in t_snap.primary_key.columns] or names
    index = [names.index(k) for k in keys]

    def stream(conn: Connection, t: sa.Table) -> Iterator[tuple[Any, ...]]:
        query = sa.select(*[t.c[n] for n in names]).order_by(*[t.c[k] for k in keys])
        result = conn.execution_options(stream_results=True).execute(query)
        while chunk := result.fetchmany(CHUNK):
            yield from (tuple(r) for r in chunk)

    waiting_live: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    waiting_snap: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    sentinel = object()
    for a, b in zip_longest(stream(live, t_live), stream(snap, t_snap), fillvalue=sentinel):
        for row, mine, other, side in ((a, waiting_live, waiting_snap, "live"),
                                       (b, waiting_snap, waiting_live, "snap")):
            if row is sentinel:
                continue
            key = tuple(row[i] for i in index)
            twin = other.pop(key, None)
            if twin is None:
                mine[key] = row
                continue
            live_row, snap_row = (row, twin) if side == "live" else (twin, row)
            if live_row != snap_row:
                cols = {n for n, x, y in zip(names, live_row, snap_row, strict=True) if x != y}
                yield key, "changed", cols
    for key in waiting_live:
        yield key, "added", set(names)
    for key in waiting_snap:
        yield key, "deleted", set(names)
