"""The v2 card store of the seed's flashcard app, on SQLite.

`front_content` and `back_content` hold JSON objects ``{"text": str, "tags": [str], "images":
[str]}``; `style` holds ``{"type": "basic" | "cloze" | "image" | ..., "color": ...}``. The v3
migration (``migrations/0001_cards_v3.py``) adds the derived columns the seed's
``OptimizedDbCard`` has: search_terms, content_hash, image_count, tag_count, has_images,
style_type.
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

TABLES_SQL = (
    """
    CREATE TABLE folders (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        parent_id INTEGER REFERENCES folders(id)
    )
    """,
    """
    CREATE TABLE cards (
        id INTEGER PRIMARY KEY,
        folder_id INTEGER REFERENCES folders(id),
        front_content TEXT NOT NULL,
        back_content TEXT NOT NULL,
        style TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )
    """,
)

INDEXES_SQL = ("CREATE INDEX idx_cards_folder_id ON cards(folder_id)",)


def create_tables(conn: sqlite3.Connection) -> None:
    for statement in TABLES_SQL:
        conn.execute(statement)


def create_indexes(conn: sqlite3.Connection) -> None:
    for statement in INDEXES_SQL:
        conn.execute(statement)


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the v2 tables and indexes (the caller commits)."""
    create_tables(conn)
    create_indexes(conn)


# The same v2 schema as SQLAlchemy tables, for PostgreSQL and MySQL/MariaDB databases.
metadata = sa.MetaData()
sa.Table(
    "folders", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("folders.id")),
)
sa.Table(
    "cards", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("folder_id", sa.Integer, sa.ForeignKey("folders.id"), index=True),
    sa.Column("front_content", sa.Text, nullable=False),
    sa.Column("back_content", sa.Text, nullable=False),
    sa.Column("style", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
)
