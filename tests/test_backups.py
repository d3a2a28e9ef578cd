"""Multi-layer backups: shadow, snapshot (optionally zstd) and off-site (file:// and a real
S3-compatible endpoint on 127.0.0.1), their manifest, `backup create|list|verify|restore|prune`,
and the refusal to use a corrupted or truncated layer (verify, resume, rollback --strategy restore)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CARDS_MIGRATIONS, assert_one_error_line, cli, digest_db, query
from safemigrate import AbortedError, BackupError, NotReadyError, UsageError
from safemigrate.backup import load_manifest, manifest_path_for, sha256_file
from safemigrate.backups import (
    create_backup,
    list_backups,
    parse_age,
    prune_backups,
    restore_backup,
    verify_backup,
)
from safemigrate.events import EventBus
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings

ROWS = 1200


@pytest.fixture
def db(make_cards_db) -> Path:
    return make_cards_db(ROWS, bad_rate=0.02)


def settings(db: Path, tmp_path: Path, migrations: Path = CARDS_MIGRATIONS, **backup: Any) -> Settings:
    return Settings(db=str(db), migrations=migrations, backup_dir=tmp_path / "backups", workers=1,
                    batch_size=200, sections={"backup": backup} if backup else {})


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def error_line(proc: Any, code: int) -> str:
    """One `error: ... (hint: ...)` line on stderr and the exact exit code."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "(hint:" in lines[0], proc.stderr
    return lines[0]


def write_config(folder: Path, db: Path, **backup: Any) -> None:
    lines = [f'db = "{db}"', f'migrations = "{CARDS_MIGRATIONS}"', 'backup_dir = "backups"', "workers = 1",
             "[backup]"]
    for key, value in backup.items():
        lines.append(f"{key} = {json.dumps(value)}")
    (folder / "safemigrate.toml").write_text("\n".join(lines) + "\n")


# -- layers and manifest ---------------------------------------------------------------------------
SHADOWED = """\
    from safemigrate import Backfill, Migration

    def normalize(row):
        return {"style": row["style"].replace('"color":null', '"color":"#ffffff"')}

    migration = Migration(id="0001_styles", steps=[
        Backfill("cards", normalize, reads=["style"], writes=["style"]),
    ])
"""


def test_run_backup_has_every_layer_in_its_manifest(db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_styles.py").write_text(textwrap.dedent(SHADOWED))
    offsite = tmp_path / "offsite"
    original = digest_db(db)
    with Migrator(settings(db, tmp_path, folder, compress="zstd", offsite=f"file://{offsite}")) as m:
        (result,) = m.run()
        record = m.journal.backups(result.run_id, kind="snapshot")[0]
    stored = Path(record["location"])
    assert stored.name.endswith(".db.zst") and not stored.with_suffix("").exists()
    manifest = load_manifest(stored)
    assert stat.S_IMODE(manifest_path_for(stored).stat().st_mode) == 0o600
    assert manifest["tool_version"] and manifest["migration"] == "0001_styles"
    assert manifest["source"].startswith("sqlite:///") and manifest["engine"] == "sqlite"
    assert manifest["created_at"] <= manifest["verified_at"]
    assert manifest["tables"]["cards"] == original["tables"]["cards"]
    layers = {la["layer"]: la for la in manifest["layers"]}
    assert set(layers) == {"snapshot", "offsite", "shadow"}
    snap = layers["snapshot"]
    assert snap["compression"] == "zstd" and snap["sha256"] == sha256_file(stored) == record["sha256"]
    assert snap["raw_sha256"] != snap["sha256"] and snap["raw_size"] > snap["size"]
    remote = offsite / stored.name
    assert layers["offsite"]["status"] == "verified" and sha256_file(remote) == snap["sha256"]
    assert (offsite / manifest_path_for(stored).name).exists(), "the manifest goes off-site too"
    shadow = layers["shadow"]
    assert shadow["rows"] == ROWS and shadow["columns"] == ["style"] and shadow["status"] == "verified"
    with Migrator(settings(db, tmp_path, folder, compress="zstd", offsite=f"file://{offsite}")) as m:
        checks = verify_backup(m, record["id"])
    assert [(c.layer, c.status) for c in checks] == [("snapshot", "verified"), ("offsite", "verified"),
                                                     ("shadow", "verified")]


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_round_trip_through_every_layer(db: Path, tmp_path: Path, compress: str) -> None:
    original = digest_db(db)
    offsite = f"file://{tmp_path / 'remote'}"
    with Migrator(settings(db, tmp_path, compress=compress, offsite=offsite)) as m:
        snapshot = create_backup(m, label="before-upgrade")
        assert "before-upgrade" in snapshot.path.name
        assert [la["status"] for la in snapshot.layers] == ["verified", "verified"]
        (info,) = list_backups(m)
        assert info.kind == "manual" and info.id == snapshot.id and info.protected is None
        assert all(c.status == "verified" for c in verify_backup(m, snapshot.id))
        for source in ("snapshot", "offsite"):
            target = tmp_path / f"restored-{source}.db"
            result = restore_backup(m, snapshot.id, to=target, source=source)
            assert result.tables == ["cards", "folders"]
            assert digest_db(target) == original, f"restore from {source} is identical"
            assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not [p for p in (tmp_path / "backups").iterdir() if p.name.endswith(".tmp")]
    kinds = [k for (k,) in query(db, "SELECT kind FROM safemigrate_backups")]
    assert kinds == ["manual"]
    events = [k for (k,) in query(db, "SELECT kind FROM safemigrate_events")]
    assert "backup.created" in events and events.count("backup.restored") == 2


def test_restore_in_place_saves_the_current_state_first(db: Path, tmp_path: Path) -> None:
    original = digest_db(db)
    with Migrator(settings(db, tmp_path, compress="zstd")) as m:
        snapshot = create_backup(m)
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM cards WHERE id % 3 = 0")
    conn.execute("UPDATE folders SET name = 'renamed'")
    conn.commit()
    conn.close()
    damaged = digest_db(db)
    with Migrator(settings(db, tmp_path, compress="zstd")) as m:
        result = restore_backup(m, snapshot.id, in_place=True)
        pre = next(r for r in m.journal.backups() if r["id"] == result.pre_restore_backup)
    assert digest_db(db) == original, "restored content digests equal the backup's"
    assert pre["kind"] == "pre-restore"
    with Migrator(settings(db, tmp_path, compress="zstd")) as m:
        restore_backup(m, pre["id"], to=tmp_path / "before-restore.db")
    assert digest_db(tmp_path / "before-restore.db") == damaged, "the replaced state was kept"
    (data,) = query(db, "SELECT data FROM safemigrate_events WHERE kind = 'backup.restored'")[0]
    assert "@" in json.loads(data)["who"]


# -- corruption is detected, named, and refused --------------------------------------------------------
@pytest.mark.parametrize("compress", ["none", "zstd"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_a_damaged_snapshot_layer(db: Path, tmp_path: Path, compress: str, damage: str) -> None:
    write_config(tmp_path, db, compress=compress)
    with Migrator(settings(db, tmp_path, compress=compress)) as m:
        snapshot = create_backup(m)
    proc = cli("backup", "verify", snapshot.id, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    if damage == "flip":
        flip_byte(snapshot.path)
    elif damage == "truncate":
        with open(snapshot.path, "r+b") as handle:
            handle.truncate(snapshot.size - 4096)
    else:
        snapshot.path.unlink()
    proc = cli("backup", "verify", snapshot.id, cwd=tmp_path)
    line = error_line(proc, 1)
    assert "layer snapshot" in line and snapshot.id in line
    assert {"flip": "corrupted", "truncate": "truncated", "delete": "missing"}[damage] in line
    with Migrator(settings(db, tmp_path, compress=compress)) as m, pytest.raises(BackupError):
        restore_backup(m, snapshot.id, to=tmp_path / "never.db")
    assert not (tmp_path / "never.db").exists()


def test_verify_names_a_corrupted_offsite_copy_and_repair_uses_it(db: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    write_config(tmp_path, db, offsite=f"file://{remote}")
    with Migrator(settings(db, tmp_path, offsite=f"file://{remote}")) as m:
        snapshot = create_backup(m)
    copy = remote / snapshot.path.name
    original_bytes = copy.read_bytes()
    flip_byte(copy, offset=len(original_bytes) - 100)
    proc = cli("backup", "verify", snapshot.id, cwd=tmp_path)
    line = error_line(proc, 1)
    assert "layer offsite" in line and "corrupted" in line
    proc = cli("backup", "restore", snapshot.id, "--to", tmp_path / "x.db", "--from", "offsite", cwd=tmp_path)
    assert "corrupted" in error_line(proc, 1)
    assert not (tmp_path / "x.db").exists()
    # the off-site copy repairs a damaged local snapshot, once it is good again
    copy.write_bytes(original_bytes)
    flip_byte(snapshot.path)
    assert cli("backup", "verify", snapshot.id, cwd=tmp_path).returncode == 1
    proc = cli("backup", "verify", snapshot.id, "--repair", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "repaired" in proc.stdout
    assert sha256_file(snapshot.path) == snapshot.sha256


def interrupt_after_first_batch(db: Path, tmp_path: Path, **backup: Any) -> str:
    bus = EventBus()
    with Migrator(settings(db, tmp_path, **backup), bus) as m:
        bus.subscribe(lambda e: m.stop.set("test stop") if e.kind == "batch" else None)
        with pytest.raises(AbortedError):
            m.run()
    (run_id,) = [r for (r,) in query(db, "SELECT id FROM safemigrate_runs WHERE status = 'interrupted'")]
    return run_id


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_resume_refuses_a_corrupted_snapshot(db: Path, tmp_path: Path, compress: str) -> None:
    run_id = interrupt_after_first_batch(db, tmp_path, compress=compress)
    (location,) = query(db, "SELECT location FROM safemigrate_backups WHERE run_id = ?", (run_id,))[0]
    snapshot = Path(location)
    good = snapshot.read_bytes()
    flip_byte(snapshot)
    during = digest_db(db)
    with Migrator(settings(db, tmp_path, compress=compress)) as m, pytest.raises(BackupError) as info:
        m.run()
    assert "layer snapshot" in info.value.message and "corrupted" in info.value.message
    assert digest_db(db) == during, "nothing changed"
    assert query(db, "SELECT status FROM safemigrate_runs WHERE id = ?", (run_id,)) == [("interrupted",)]
    proc = cli("run", "--db", db, "-m", CARDS_MIGRATIONS, "--backup-dir", tmp_path / "backups",
               "--workers", "1", cwd=tmp_path)
    assert "corrupted" in assert_one_error_line(proc, 1, tmp_path, "run")
    snapshot.write_bytes(good)
    with Migrator(settings(db, tmp_path, compress=compress)) as m:
        (result,) = m.run()
    assert result.run_id == run_id and result.status == "completed"


def test_resume_and_the_offsite_layer(db: Path, tmp_path: Path) -> None:
    """A corrupted off-site copy stops a resume only when the layer is required."""
    remote = tmp_path / "remote"
    offsite = f"file://{remote}"
    run_id = interrupt_after_first_batch(db, tmp_path, offsite=offsite, offsite_required=True)
    (copy,) = list(remote.glob("*.db"))
    flip_byte(copy)
    with Migrator(settings(db, tmp_path, offsite=offsite, offsite_required=True)) as m, \
            pytest.raises(BackupError) as info:
        m.run()
    assert "layer offsite" in info.value.message
    assert query(db, "SELECT status FROM safemigrate_runs WHERE id = ?", (run_id,)) == [("interrupted",)]
    with Migrator(settings(db, tmp_path, offsite=offsite)) as m:
        (result,) = m.run()
    assert result.status == "completed"
    warnings = query(db, "SELECT message FROM safemigrate_events WHERE kind = 'backup.offsite_failed'")
    assert warnings and "corrupted" in warnings[0][0]


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_rollback_restore_uses_only_a_verified_snapshot(db: Path, tmp_path: Path, compress: str) -> None:
    original = digest_db(db)
    with Migrator(settings(db, tmp_path, compress=compress)) as m:
        (result,) = m.run()
    migrated = digest_db(db)
    (location,) = query(db, "SELECT location FROM safemigrate_backups WHERE kind = 'snapshot'")[0]
    snapshot = Path(location)
    good = snapshot.read_bytes()
    flip_byte(snapshot)
    with Migrator(settings(db, tmp_path, compress=compress)) as m, pytest.raises(BackupError) as info:
        m.rollback(result.run_id, strategy="restore")
    assert "corrupted" in info.value.message
    assert digest_db(db) == migrated
    snapshot.write_bytes(good)
    with Migrator(settings(db, tmp_path, compress=compress)) as m:
        m.rollback(result.run_id, strategy="restore")
    assert digest_db(db) == original
    assert not [p for p in snapshot.parent.iterdir() if p.name.endswith((".tmp",)) or
                (compress == "zstd" and p.name == snapshot.name[:-4])], "decompressed copies removed"


def test_offsite_failure_is_a_warning_unless_required(db: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created below it")
    bad = f"file://{blocker}/remote"
    before = digest_db(db)
    with Migrator(settings(db, tmp_path, offsite=bad, offsite_required=True)) as m, \
            pytest.raises(NotReadyError) as ready:
        m.run()  # the pre-migration checks see it first
    assert "layer offsite" in ready.value.message
    with Migrator(settings(db, tmp_path, offsite=bad, offsite_required=True)) as m, \
            pytest.raises(BackupError) as info:
        m.run({"backup-destinations": "test: let the backup itself meet the failure"})
    assert "off-site copy" in info.value.message
    assert digest_db(db) == before, "a required layer failing stops the run before any change"
    assert not list((tmp_path / "backups").glob("*.db*")), "nothing left behind"
    bus = EventBus()
    seen: list[str] = []
    bus.subscribe(lambda e: seen.append(e.kind))
    with Migrator(settings(db, tmp_path, offsite=bad), bus) as m:
        (result,) = m.run()
    assert result.status == "completed" and "backup.offsite_failed" in seen
    (message,) = query(db, "SELECT message FROM safemigrate_events WHERE kind = 'backup.offsite_failed'")[0]
    assert "not required" in message
    manifest = load_manifest(Path(query(db, "SELECT location FROM safemigrate_backups")[0][0]))
    assert [la["status"] for la in manifest["layers"] if la["layer"] == "offsite"] == ["failed"]


# -- S3 (moto's server on 127.0.0.1) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_backup(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import fsspec

    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    bucket = f"sm-{os.getpid()}-{id(options) % 100000}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.mkdir(bucket)
    return {"offsite": f"s3://{bucket}/backups", "offsite_options": options, "fs": fs, "bucket": bucket}


def test_offsite_layer_on_s3(db: Path, tmp_path: Path, s3_backup: dict[str, Any]) -> None:
    fs = s3_backup.pop("fs")
    bucket = s3_backup.pop("bucket")
    original = digest_db(db)
    with Migrator(settings(db, tmp_path, compress="zstd", **s3_backup)) as m:
        snapshot = create_backup(m)
        remote = next(la for la in snapshot.layers if la["layer"] == "offsite")
        assert remote["status"] == "verified", remote
        assert remote["location"] == f"s3://{bucket}/backups/{snapshot.path.name}"
        key = f"{bucket}/backups/{snapshot.path.name}"
        assert fs.info(key)["size"] == snapshot.size
        assert fs.exists(f"{bucket}/backups/{manifest_path_for(snapshot.path).name}")
        assert all(c.status == "verified" for c in verify_backup(m, snapshot.id))
        restore_backup(m, snapshot.id, to=tmp_path / "from-s3.db", source="offsite")
        assert digest_db(tmp_path / "from-s3.db") == original
        data = bytearray(fs.cat(key))
        data[len(data) // 3] ^= 0x40
        fs.pipe(key, bytes(data))
        results = {c.layer: c for c in verify_backup(m, snapshot.id)}
        assert results["snapshot"].status == "verified"
        assert results["offsite"].status == "failed" and "corrupted" in results["offsite"].details
        with pytest.raises(BackupError):
            restore_backup(m, snapshot.id, to=tmp_path / "never.db", source="offsite")
        prune_backups(m, keep=0)
        assert not fs.exists(key), "pruning removes the off-site copy too"


def test_unreachable_s3_endpoint_is_a_warning(db: Path, tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with Migrator(settings(db, tmp_path, offsite="s3://nowhere/b", offsite_options=options)) as m:
        snapshot = create_backup(m)
    (remote,) = [la for la in snapshot.layers if la["layer"] == "offsite"]
    assert remote["status"] == "failed" and remote["error"]


# -- prune ---------------------------------------------------------------------------------------------
def test_prune_rule(db: Path, tmp_path: Path) -> None:
    with Migrator(settings(db, tmp_path)) as m:
        (completed,) = m.run()
        manual = [create_backup(m, label=f"m{i}") for i in range(3)]
    interrupted_db = db  # a second migration folder would be overkill: mark a copy of the run
    with Migrator(settings(interrupted_db, tmp_path)) as m:
        records = {r["kind"]: r for r in m.journal.backups()}
    run_snapshot = records["snapshot"]
    with Migrator(settings(db, tmp_path)) as m:
        assert parse_age("7d") == 7 * 86400 and parse_age("90s") == 90
        with pytest.raises(UsageError):
            prune_backups(m)
        preview = prune_backups(m, older_than=0, dry_run=True)
        assert {b.id for b in preview.pruned} == {s.id for s in manual}
        assert all(Path(s.path).exists() for s in manual), "a dry run deletes nothing"
        kept = dict((b.id, why) for b, why in preview.kept)
        assert "--keep" in kept[run_snapshot["id"]], "a completed run's snapshot needs --keep"
        result = prune_backups(m, older_than=0)
        assert {b.id for b in result.pruned} == {s.id for s in manual}
        assert not manual[0].path.exists() and not manifest_path_for(manual[0].path).exists()
        assert Path(run_snapshot["location"]).exists()
        statuses = dict(query(db, "SELECT id, status FROM safemigrate_backups"))
        assert statuses[manual[0].id] == "pruned" and statuses[run_snapshot["id"]] == "verified"
        assert prune_backups(m, keep=1).pruned == [], "the newest prunable backup is kept"
        result = prune_backups(m, keep=0)
        assert [b.id for b in result.pruned] == [run_snapshot["id"]]
        assert not Path(run_snapshot["location"]).exists(), "--keep counts a completed run's snapshot"
        assert [b.id for b in list_backups(m)] == []
        assert len(list_backups(m, include_pruned=True)) == 4
    events = query(db, "SELECT message FROM safemigrate_events WHERE kind = 'backup.pruned'")
    assert len(events) == 4 and all("pruned by" in e for (e,) in events)
    assert completed.status == "completed"


def test_prune_never_touches_unfinished_or_rolled_back_runs(db: Path, tmp_path: Path) -> None:
    interrupted = interrupt_after_first_batch(db, tmp_path)
    with Migrator(settings(db, tmp_path)) as m:
        result = prune_backups(m, keep=0, older_than=0)
        assert result.pruned == []
        ((info, why),) = result.kept
        assert info.run_id == interrupted and "interrupted" in why
        m.rollback(interrupted)
        result = prune_backups(m, keep=0, older_than=0)
        assert result.pruned == []
        assert {b.kind for b, _ in result.kept} == {"snapshot", "pre-rollback"}
        assert all("rolled_back" in why for _, why in result.kept)
    assert all(Path(loc).exists() for (loc,) in query(db, "SELECT location FROM safemigrate_backups"))


def test_backup_cli(db: Path, tmp_path: Path) -> None:
    write_config(tmp_path, db, compress="zstd")
    proc = cli("backup", "create", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)
    assert created["compression"] == "zstd" and created["tables"] == ["cards", "folders"]
    listed = json.loads(cli("backup", "list", "--json", cwd=tmp_path).stdout)
    assert [b["id"] for b in listed] == [created["id"]]
    assert created["id"] in cli("backup", "list", cwd=tmp_path).stdout
    proc = cli("backup", "restore", created["id"], cwd=tmp_path)
    error_line(proc, 2)
    (tmp_path / "taken.db").write_text("x")
    proc = cli("backup", "restore", created["id"], "--to", "taken.db", cwd=tmp_path)
    assert "never overwrites" in error_line(proc, 2)
    proc = cli("backup", "verify", "nosuchid", cwd=tmp_path)
    assert "no backup" in error_line(proc, 2)
    proc = cli("backup", "restore", created["id"][:6], "--in-place", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "content digests equal" in proc.stdout
    proc = cli("backup", "prune", "--older-than", "soon", cwd=tmp_path)
    assert "age" in error_line(proc, 2)
    proc = cli("backup", "prune", "--keep", "1", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["pruned"]) == 1  # the pre-restore backup is the newest


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_backup_round_trip_on_a_server(kind: str, tmp_path: Path) -> None:
    """create (zstd + off-site), verify every layer, restore in place over damaged tables."""
    import sqlalchemy as sa

    from backends import create_database, drop_database, engine_for
    from safemigrate.digest import database_digest
    from safemigrate.examples.cards.generate import generate_into

    url = create_database(kind, tmp_path)
    engine = engine_for(url)
    try:
        generate_into(url, rows=400)
        with engine.connect() as conn:
            original = database_digest(conn, ["cards", "folders"])
        s = Settings(db=url, migrations=CARDS_MIGRATIONS, backup_dir=tmp_path / "backups", workers=1,
                     sections={"backup": {"compress": "zstd", "offsite": f"file://{tmp_path / 'remote'}"}})
        with Migrator(s) as m:
            snapshot = create_backup(m)
            assert [la["status"] for la in snapshot.layers] == ["verified", "verified"]
            assert all(c.status == "verified" for c in verify_backup(m, snapshot.id))
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM cards WHERE id > 200"))
            result = restore_backup(m, snapshot.id, in_place=True)
            assert result.pre_restore_backup
            with pytest.raises(UsageError):
                restore_backup(m, snapshot.id, to=tmp_path / "x.db")  # a dump is not a SQLite file
        with engine.connect() as conn:
            assert database_digest(conn, ["cards", "folders"]) == original
    finally:
        engine.dispose()
        drop_database(kind, url)


# -- audit of issue 3: a damaged shadow layer ----------------------------------------------------------
def migrate_with_shadow(db: Path, tmp_path: Path) -> tuple[str, str, str]:
    """Run SHADOWED to completion: (run id, its snapshot's backup id, the shadow table)."""
    folder = tmp_path / "migrations"
    folder.mkdir(exist_ok=True)
    (folder / "0001_styles.py").write_text(textwrap.dedent(SHADOWED))
    with Migrator(settings(db, tmp_path, folder)) as m:
        (result,) = m.run()
        record = m.journal.backups(result.run_id, kind="snapshot")[0]
    (shadow,) = [la["location"].removeprefix("table ") for la in load_manifest(Path(record["location"]))
                 ["layers"] if la["layer"] == "shadow"]
    return result.run_id, record["id"], shadow


def damage_shadow(db: Path, shadow: str, damage: str) -> None:
    conn = sqlite3.connect(db)
    if damage == "truncated":
        conn.execute(f"DELETE FROM {shadow} WHERE id % 2 = 0")  # half the old values gone
    else:
        conn.execute(f"DROP TABLE {shadow}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage", ["truncated", "dropped"])
def test_verify_names_a_damaged_shadow_layer(db: Path, tmp_path: Path, damage: str) -> None:
    run_id, backup_id, shadow = migrate_with_shadow(db, tmp_path)
    write_config(tmp_path, db)
    (tmp_path / "safemigrate.toml").write_text((tmp_path / "safemigrate.toml").read_text().replace(
        str(CARDS_MIGRATIONS), str(tmp_path / "migrations")))
    assert cli("backup", "verify", backup_id, cwd=tmp_path).returncode == 0
    damage_shadow(db, shadow, damage)
    proc = cli("backup", "verify", backup_id, cwd=tmp_path)
    line = error_line(proc, 1)
    assert f"layer shadow ({shadow})" in line and backup_id in line, line
    expected = f"holds {ROWS // 2} rows, the manifest says {ROWS}" if damage == "truncated" else "is missing"
    assert expected in line and "restore strategy" in line, line
    proc = cli("backup", "verify", backup_id, "--json", cwd=tmp_path)
    layers = {la["layer"]: la["status"] for la in json.loads(proc.stdout)["layers"]}
    assert proc.returncode == 1 and layers == {"snapshot": "verified", "shadow": "failed"}
    (message,) = query(db, "SELECT message FROM safemigrate_events WHERE kind = 'backup.verify' "
                           "AND level = 'error' LIMIT 1")[0]
    assert "layer shadow" in message
    assert query(db, "SELECT status FROM safemigrate_runs WHERE id = ?", (run_id,)) == [("completed",)]


@pytest.mark.parametrize("damage", [
    "truncated",
    "dropped",
])
def test_reverse_rollback_refuses_a_damaged_shadow(db: Path, tmp_path: Path, damage: str) -> None:
    """Rollback step 1: the layer the strategy needs must exist *and verify*. A damaged shadow is
    refused before anything changes (the hint names the restore strategy); the verified
    snapshot then gives the original data back."""
    original = digest_db(db)
    run_id, _backup_id, shadow = migrate_with_shadow(db, tmp_path)
    migrated = digest_db(db)
    assert migrated != original
    damage_shadow(db, shadow, damage)
    folder = tmp_path / "migrations"
    with Migrator(settings(db, tmp_path, folder)) as m, pytest.raises(BackupError) as info:
        m.rollback(run_id)
    assert shadow in info.value.message and "--strategy restore" in info.value.hint
    assert digest_db(db) == migrated, "a refused rollback changes nothing"
    assert query(db, "SELECT status FROM safemigrate_runs WHERE id = ?", (run_id,)) == [("completed",)]
    assert not query(db, "SELECT 1 FROM safemigrate_backups WHERE kind = 'pre-rollback'"), \
        "refused in its prerequisites, before the pre-rollback backup"
    with Migrator(settings(db, tmp_path, folder)) as m:
        result = m.rollback(run_id, strategy="restore")
    assert result.status == "rolled_back" and result.strategy == "restore"
    assert digest_db(db) == original
