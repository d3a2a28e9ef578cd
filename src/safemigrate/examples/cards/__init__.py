"""The flashcard example: the seed's card store (schema v2), a generator for it, and the v3
migration that adds derived search and statistics columns. See README.md."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .schema import create_schema

if TYPE_CHECKING:
    from .generate import generate

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

__all__ = ["MIGRATIONS_DIR", "create_schema", "generate"]


def __getattr__(name: str) -> Any:
    # `generate` is imported lazily so `python -m safemigrate.examples.cards.generate` runs
    # without runpy's "found in sys.modules" warning.
    if name == "generate":
        from .generate import generate as func

        globals()["generate"] = func  # replaces the submodule attribute the import just set
        return func
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
