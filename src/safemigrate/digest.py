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
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

CHUNK = 4096


def reflect(conn: Connection, table: str) -> sa.Table:
    """Reflect a table; unknown column types (custom SQLite types) are fine for reading."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        return sa.Table(table, sa.MetaData(), autoload_with=conn)


def order_columns(table: sa.Table) -> list[sa.Column]:
    """Primary key order, or every column for a table without one (still deterministic)."""
    pk = list(table.primary_key.columns)
    return pk or list(table.columns)


def table_digest(conn: Connection, table: str, columns: list[str] | None = None) -> dict[str, Any]:
    """{"rows": n, "columns": {name: sha256}} for the given (default: all) columns."""
    t = reflect(conn, table)
    names = columns if columns is not None else [c.name for c in t.columns]
    hashers = {name: hashlib.sha256() for name in names}
    rows = 0
    query = sa.select(*[t.c[n] for n in names]).order_by(*order_columns(t))
    result = conn.execution_options(stream_results=True).execute(query)
    while chunk := result.fetchmany(CHUNK):
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
