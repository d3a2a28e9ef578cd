"""Card store v2 → v3: the derived search and statistics fields of the seed's OptimizedDbCard."""

from safemigrate import AddColumn, Backfill, CreateIndex, Migration
from safemigrate.examples.cards import smoke
from safemigrate.examples.cards.transform import optimize_card, validate_card

migration = Migration(
    id="0001_cards_v3",
    description="cards v3: search terms, content hash, image/tag counts and style type",
    steps=[
        AddColumn("cards", "search_terms", "TEXT"),
        AddColumn("cards", "content_hash", "TEXT"),
        AddColumn("cards", "image_count", "INTEGER"),
        AddColumn("cards", "tag_count", "INTEGER"),
        AddColumn("cards", "has_images", "INTEGER"),
        AddColumn("cards", "style_type", "TEXT"),
        Backfill(
            "cards",
            optimize_card,
            reads=["front_content", "back_content", "style"],
            writes=[
                "search_terms",
                "content_hash",
                "image_count",
                "tag_count",
                "has_images",
                "style_type",
            ],
            validate=validate_card,
        ),
        CreateIndex("cards", ["content_hash"], name="idx_cards_content_hash"),
        CreateIndex("cards", ["style_type"], name="idx_cards_style_type"),
    ],
    invariants=[smoke.check_counts_consistent],
    smoke_checks=[
        smoke.check_card_crud,
        smoke.check_search,
        smoke.check_folder_query,
        smoke.check_tag_query,
    ],
    rollback_smoke_checks=list(smoke.ROLLBACK_SMOKE_CHECKS),  # the v2 schema, after a rollback
)
