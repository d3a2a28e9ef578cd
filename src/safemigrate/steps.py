"""Steps: the value objects a migration is made of. Each knows its SQL and its inverse.

`plan` and `run` use the same objects: `sql()` is what `plan` prints and what `apply()` executes.
A step that cannot be undone says so (`reversible = False`) and `plan` flags it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._exceptions import IrreversibleError, MigrationFileError

if TYPE_CHECKING:
    from .dialects import Dialect

Row = dict[str, Any]
Transform = Callable[[Row], Mapping[str, Any]]
Validator = Callable[[Row, Mapping[str, Any]], Any]

_TYPE_TEXT = re.compile(r"^[A-Za-z][A-Za-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?$")


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise MigrationFileError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _type_sql(type_: str | sa.types.TypeEngine | type, dialect: Dialect) -> str:
    if isinstance(type_, str):
        if not _TYPE_TEXT.match(type_.strip()):
            raise MigrationFileError(
                f"column type {type_!r} is not a plain SQL type",
                "use a type name like TEXT, INTEGER, VARCHAR(64), or a SQLAlchemy type",
            )
        return type_.strip()
    if isinstance(type_, type):
        type_ = type_()
    return type_.compile(dialect=dialect.engine.dialect)


def _default_sql(default: Any, dialect: Dialect) -> str | None:
    if default is None:
        return None
    if isinstance(default, sa.sql.elements.TextClause):
        return f"({default.text})"
    literal = sa.literal(default).compile(
        dialect=dialect.engine.dialect, compile_kwargs={"literal_binds": True}
    )
    return str(literal)


@dataclass
class Step:
    """Base: a schema change executed inside one transaction with its journal entry."""

    reversible = True
    kind = "step"

    def tables(self) -> set[str]:
        """Tables this step touches: their snapshot and digests are taken first."""
        return set()

    def creates_tables(self) -> set[str]:
        return set()

    def describe(self) -> str:
        return self.kind

    def sql(self, dialect: Dialect) -> list[str]:
        """The statements `apply` runs, as `plan` prints them."""
        return []

    def inverse_sql(self, dialect: Dialect, state: Mapping[str, Any]) -> list[str]:
        """The statements `revert` runs."""
        raise IrreversibleError(f"step {self.describe()} has no inverse")

    def capture(self, conn: Connection, dialect: Dialect) -> dict[str, Any]:
        """What revert will need, read before the step runs (journaled with the step)."""
        return {}

    def apply(self, conn: Connection, dialect: Dialect, state: Mapping[str, Any]) -> None:
        for statement in self.sql(dialect):
            conn.exec_driver_sql(statement)

    def revert(self, conn: Connection, dialect: Dialect, state: Mapping[str, Any]) -> None:
        for statement in self.inverse_sql(dialect, state):
            conn.exec_driver_sql(statement)

    def autocommit(self, dialect: Dialect) -> bool:
        """Whether the step must run outside a transaction (e.g. CREATE INDEX CONCURRENTLY)."""
        return False

    def is_applied(self, conn: Connection, dialect: Dialect) -> bool | None:
        """Whether the step's effect is in the database (None: cannot tell). Used to repair a
        step interrupted between its DDL and its journal entry on engines without
        transactional DDL."""
        return None

    def repair(self, conn: Connection, dialect: Dialect) -> None:
        """Clear the remains of an attempt interrupted half-way (before `is_applied` is asked),
        e.g. the INVALID index a failed CREATE INDEX CONCURRENTLY leaves. `conn` autocommits."""
        return None


@dataclass
class AddColumn(Step):
    """Add a nullable (or defaulted) column. Inverse: drop it."""

    table: str
    column: str
    type_: str | sa.types.TypeEngine | type = "TEXT"
    nullable: bool = True
    default: Any = None
    kind = "add_column"

    def __post_init__(self) -> None:
        _check_name("AddColumn table", self.table)
        _check_name("AddColumn column", self.column)
        if not self.nullable and self.default is None:
            raise MigrationFileError(
                f"AddColumn {self.table}.{self.column} is NOT NULL without a default",
                "give it a default, or add it nullable and backfill it",
            )

    def tables(self) -> set[str]:
        return {self.table}

    def describe(self) -> str:
        return f"add column {self.table}.{self.column}"

    def sql(self, dialect: Dialect) -> list[str]:
        return [
            dialect.add_column_sql(
                self.table, self.column, _type_sql(self.type_, dialect),
                _default_sql(self.default, dialect), self.nullable,
            )
        ]

    def inverse_sql(self, dialect: Dialect, state: Mapping[str, Any]) -> list[str]:
        return [dialect.drop_column_sql(self.table, self.column)]

    def is_applied(self, conn: Connection, dialect: Dialect) -> bool | None:
        return self.column in {c["name"] for c in sa.inspect(conn).get_columns(self.table)}


@dataclass
class CreateTable(Step):
    """Create a table from SQLAlchemy columns. Inverse: drop it (its rows are in the
    pre-rollback backup first, so nothing the application wrote is destroyed unseen)."""

    table: str
    columns: Sequence[sa.Column] = field(default_factory=list)
    kind = "create_table"

    def __post_init__(self) -> None:
        _check_name("CreateTable table", self.table)
        if not self.columns or not all(isinstance(c, sa.Column) for c in self.columns):
            raise MigrationFileError(
                f"CreateTable {self.table} needs a list of sqlalchemy.Column objects"
            )

    def _table(self) -> sa.Table:
        return sa.Table(self.table, sa.MetaData(), *[c._copy() for c in self.columns])

    def tables(self) -> set[str]:
        return {self.table}

    def creates_tables(self) -> set[str]:
        return {self.table}

    def describe(self) -> str:
        return f"create table {self.table}"

    def sql(self, dialect: Dialect) -> list[str]:
        table = self._table()
        statements = [str(sa.schema.CreateTable(table).compile(dialect=dialect.engine.dialect))]
        for index in table.indexes:
            statements.append(
                str(sa.schema.CreateIndex(index).compile(dialect=dialect.engine.dialect))
            )
        return [s.strip() for s in statements]

    def inverse_sql(self, dialect: Dialect, state: Mapping[str, Any]) -> list[str]:
        return [f"DROP TABLE {dialect.quote(self.table)}"]

    def is_applied(self, conn: Connection, dialect: Dialect) -> bool | None:
        return sa.inspect(conn).has_table(self.table)


@dataclass
class CreateIndex(Step):
    """Create an index. Inverse: drop it."""

    table: str
    columns: Sequence[str] = field(default_factory=list)
    name: str | None = None
    unique: bool = False
    kind = "create_index"

    def __post_init__(self) -> None:
        _check_name("CreateIndex table", self.table)
        if isinstance(self.columns, str):
            self.columns = [self.columns]
        if not self.columns:
            raise MigrationFileError(f"CreateIndex on {self.table} needs at least one column")
        self.columns = [_check_name("CreateIndex column", c) for c in self.columns]
        if self.name is None:
            self.name = f"ix_{self.table}_{'_'.join(self.columns)}"

    def _index(self) -> sa.Index:
        table = sa.Table(self.table, sa.MetaData(), *[sa.Column(c) for c in self.columns])
        return sa.Index(self.name, *[table.c[c] for c in self.columns], unique=self.unique)

    def tables(self) -> set[str]:
        return {self.table}

    def describe(self) -> str:
        unique = "unique " if self.unique else ""
        return f"create {unique}index {self.name} on {self.table}({', '.join(self.columns)})"

    def sql(self, dialect: Dialect) -> list[str]:
        return [dialect.create_index_sql(self._index())[0]]

    def inverse_sql(self, dialect: Dialect, state: Mapping[str, Any]) -> list[str]:
        return [dialect.drop_index_sql(self._index())[0]]

    def autocommit(self, dialect: Dialect) -> bool:
        return dialect.create_index_sql(self._index())[1]

    def is_applied(self, conn: Connection, dialect: Dialect) -> bool | None:
        return dialect.has_index(conn, self.table, str(self.name))

    def repair(self, conn: Connection, dialect: Dialect) -> None:
        dialect.prepare_index(conn, self.table, str(self.name))  # a failed build's leftover

    def apply(self, conn: Connection, dialect: Dialect, state: Mapping[str, Any]) -> None:
        self.repair(conn, dialect)
        super().apply(conn, dialect, state)


@dataclass
class DropIndex(Step):
    """Drop an index. Its exact definition is captured first, so the inverse recreates it."""

    table: str
    name: str
    kind = "drop_index"

    def __post_init__(self) -> None:
        _check_name("DropIndex table", self.table)
        _check_name("DropIndex name", self.name)

    def tables(self) -> set[str]:
        return {self.table}

    def describe(self) -> str:
        return f"drop index {self.name} on {self.table}"

    def _index(self) -> sa.Index:
        table = sa.Table(self.table, sa.MetaData(), sa.Column("_x"))
        return sa.Index(self.name, table.c._x)

    def sql(self, dialect: Dialect) -> list[str]:
        return [dialect.drop_index_sql(self._index())[0]]

    def autocommit(self, dialect: Dialect) -> bool:
        return dialect.drop_index_sql(self._index())[1]

    def capture(self, conn: Connection, dialect: Dialect) -> dict[str, Any]:
        definition = dialect.index_definition(conn, self.table, self.name)
        if definition is None:
            raise MigrationFileError(
                f"index {self.name} on {self.table} does not exist",
                "check the index name with your database's schema browser",
            )
        return {"definition": definition}

    def is_applied(self, conn: Connection, dialect: Dialect) -> bool | None:
        return not dialect.has_index(conn, self.table, self.name)

    def repair(self, conn: Connection, dialect: Dialect) -> None:
        dialect.prepare_index(conn, self.table, self.name)  # a failed rebuild's leftover

    def inverse_sql(self, dialect: Dialect, state: Mapping[str, Any]) -> list[str]:
        if not state.get("definition"):
            raise IrreversibleError(f"the definition of index {self.name} was not captured")
        return [state["definition"]]


@dataclass
class RawSQL(Step):
    """Hand-written SQL. Reversible only when `down` is given; name the `tables` it touches so
    they are snapshotted and digested."""

    up: str | Sequence[str] = ""
    down: str | Sequence[str] | None = None
    touches: Iterable[str] = ()
    kind = "raw_sql"

    def __post_init__(self) -> None:
        self.up = [self.up] if isinstance(self.up, str) else list(self.up)
        if not any(s.strip() for s in self.up):
            raise MigrationFileError("RawSQL needs the SQL to run in `up`")
        if self.down is not None:
            self.down = [self.down] if isinstance(self.down, str) else list(self.down)
        self.touches = set(self.touches)

    @property
    def reversible(self) -> bool:  # type: ignore[override]
        return self.down is not None

    def tables(self) -> set[str]:
        return set(self.touches)

    def describe(self) -> str:
        first = " ".join(self.up[0].split())
        return f"raw SQL: {first[:60]}{'…' if len(first) > 60 else ''}"

    def sql(self, dialect: Dialect) -> list[str]:
        return list(self.up)

    def inverse_sql(self, dialect: Dialect, state: Mapping[str, Any]) -> list[str]:
        if self.down is None:
            raise IrreversibleError(f"{self.describe()} has no `down` SQL")
        return list(self.down)


@dataclass
class Backfill(Step):
    """Compute `writes` from `reads` for every row, in keyset batches.

    `transform(row)` gets the primary key and the `reads` columns as a dict and returns a dict
    of exactly the `writes` columns; it raises to reject the row, which is then quarantined and
    left unchanged. `validate(row, new_values)` may raise or return False to reject the result.
    Inverse: the old values of `writes`, kept in the in-database shadow copy.
    """

    table: str
    transform: Transform | None = None
    reads: Sequence[str] = field(default_factory=list)
    writes: Sequence[str] = field(default_factory=list)
    validate: Validator | None = None
    batch_size: int | None = None
    kind = "backfill"

    def __post_init__(self) -> None:
        _check_name("Backfill table", self.table)
        if not callable(self.transform):
            raise MigrationFileError(f"Backfill on {self.table} needs a callable transform")
        if self.validate is not None and not callable(self.validate):
            raise MigrationFileError(f"Backfill on {self.table}: validate must be callable")
        self.reads = [_check_name("Backfill reads", c) for c in self.reads]
        self.writes = [_check_name("Backfill writes", c) for c in self.writes]
        if not self.writes:
            raise MigrationFileError(f"Backfill on {self.table} must declare the columns it writes")
        if self.batch_size is not None and self.batch_size < 1:
            raise MigrationFileError(f"Backfill on {self.table}: batch_size must be positive")

    def tables(self) -> set[str]:
        return {self.table}

    def describe(self) -> str:
        return f"backfill {self.table}: {', '.join(self.reads)} -> {', '.join(self.writes)}"

    def sql(self, dialect: Dialect) -> list[str]:
        q = dialect.quote
        sets = ", ".join(f"{q(c)} = ?" for c in self.writes)
        return [f"UPDATE {q(self.table)} SET {sets} WHERE <primary key> = ?  -- per row, in batches"]

    def apply(self, conn: Connection, dialect: Dialect, state: Mapping[str, Any]) -> None:
        raise NotImplementedError("Backfill runs through safemigrate.engine, not apply()")


SCHEMA_STEPS = (AddColumn, CreateTable, CreateIndex, DropIndex, RawSQL)
