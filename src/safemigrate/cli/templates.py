"""Files `init` and `new` write."""

CONFIG = """\
# safemigrate settings; command-line options and SAFEMIGRATE_DB override them.
{db_line}
migrations = "{migrations}"
backup_dir = ".safemigrate/backups"
batch_size = 2000
# workers = 4            # transform processes (default: CPU count)
# lock_timeout = 10      # seconds to wait for a database lock
# disk_factor = 3.0      # free disk needed, as a multiple of the data size
# auto_rollback = true   # roll back by itself when validation fails
"""

MIGRATION = '''\
"""{title}"""

from safemigrate import AddColumn, Backfill, CreateIndex, Migration  # noqa: F401


def transform(row):
    """Gets the primary key and the `reads` columns; returns exactly the `writes` columns.
    Raise to reject a row: it is quarantined with the error and left unchanged."""
    return {{"new_column": row["old_column"]}}


migration = Migration(
    id="{id}",
    description="{title}",
    steps=[
        # AddColumn("my_table", "new_column", "TEXT"),
        # Backfill("my_table", transform, reads=["old_column"], writes=["new_column"]),
        # CreateIndex("my_table", ["new_column"]),
    ],
)
'''
