"""`vserver backup` / `vserver restore`: the SQLite database and the blob folder in one archive.

The database is copied with SQLite's online backup API (`sqlite3.Connection.backup`), which gives a
consistent snapshot while the server keeps writing; a plain file copy of a WAL database can catch it between
a page write and its commit. The database goes first, the blobs after: a blob is written (and renamed into
place) before the row naming it is committed, so every blob the snapshot references is already on disk when
the folder is read. Uploads in progress (`*.part`) are left out. PostgreSQL is dumped with its own tools
(`pg_dump`); `--blobs-only` then archives the rest (docs/deployment.md "Backup and restore"). With the S3
blob store the archive holds no blobs: the bucket is backed up with its own tools.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import quote

from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from vfed.server.config import Settings

MANIFEST = "vfed-backup.json"
DATABASE = "vserver.sqlite"
BLOBS = "blobs"
JWT_SECRET = "jwt_secret"
FORMAT = 1


class BackupError(Exception):
    """A backup or restore that cannot be done; one line saying why and what to do."""


@dataclass(frozen=True)
class Summary:
    database: bool
    blobs: int


def sqlite_path(settings: Settings) -> Path | None:
    """The SQLite file behind the settings' database URL, or None for another database."""
    try:
        url = make_url(settings.db_url())
    except ArgumentError:
        raise BackupError("database_url is not a database URL") from None
    if url.get_backend_name() != "sqlite":
        return None
    if not url.database or url.database == ":memory:":
        raise BackupError("database_url is an in-memory SQLite database: nothing to back up")
    return Path(url.database)


def backup(settings: Settings, archive: Path, *, blobs_only: bool = False) -> Summary:
    """Write `archive` (a gzipped tar, mode 0600: it holds password hashes and the JWT secret)."""
    db_file = sqlite_path(settings)
    if blobs_only and settings.blobs.s3 is not None:
        raise BackupError(
            _in_bucket(settings) + ": back them up with the bucket's own tools (versioning, "
            'replication, a copy with `mc mirror`; docs/deployment.md "S3 blob store")'
        )
    if db_file is None and not blobs_only:
        raise BackupError(
            "the database is not SQLite: dump it with pg_dump -Fc, then archive the blobs with "
            '`vserver backup --blobs-only` (docs/deployment.md "Backup and restore")'
        )
    if db_file is not None and not blobs_only and not db_file.is_file():
        raise BackupError(f"no database at {db_file}: nothing to back up")
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".part")  # renamed when complete: no half archive left
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a .part file left by an earlier attempt keeps its mode otherwise
        with os.fdopen(fd, "wb") as raw:
            summary = _write(raw, settings, db_file, blobs_only)
        os.replace(partial, archive)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return summary


def _write(raw: BinaryIO, settings: Settings, db_file: Path | None, blobs_only: bool) -> Summary:
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        with_db = db_file is not None and not blobs_only
        if with_db:
            assert db_file is not None
            with tempfile.TemporaryDirectory() as tmp:
                snapshot = Path(tmp) / DATABASE
                try:
                    _snapshot(db_file, snapshot)
                except sqlite3.Error as exc:
                    raise BackupError(f"{db_file}: cannot copy the database: {exc}") from None
                tar.add(snapshot, arcname=DATABASE)
        count = 0 if settings.blobs.s3 is not None else _add_blobs(tar, settings.blob_path())
        secret = settings.data_dir / JWT_SECRET
        if secret.is_file():
            tar.add(secret, arcname=JWT_SECRET)
        manifest = {"format": FORMAT, "created": time.time(), "database": with_db, "blobs": count}
        _add_bytes(tar, MANIFEST, json.dumps(manifest).encode())
    return Summary(with_db, count)


def _in_bucket(settings: Settings) -> str:
    assert settings.blobs.s3 is not None
    return f"the blobs are in S3 bucket {settings.blobs.s3.bucket} at {settings.blobs.s3.endpoint}, not here"


def _snapshot(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"file:{quote(str(source))}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _add_blobs(tar: tarfile.TarFile, root: Path) -> int:
    count = 0
    if not root.is_dir():
        return 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith(".part"):
            continue
        with contextlib.suppress(FileNotFoundError):  # removed by the collector meanwhile: unreferenced
            tar.add(path, arcname=f"{BLOBS}/{path.relative_to(root).as_posix()}")
            count += 1
    return count


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def restore(settings: Settings, archive: Path, *, force: bool = False) -> Summary:
    """Unpack `archive` into the settings' database file, blob folder and data folder.

    A data folder that already holds anything is refused unless `force`: restoring over a live server's
    files would mix two histories. With `force` the database file and blob folder are replaced.
    """
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            return _restore(tar, settings, archive, force)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BackupError(f"{archive}: not a vserver backup ({exc})") from None


def _restore(tar: tarfile.TarFile, settings: Settings, archive: Path, force: bool) -> Summary:
    manifest = _manifest(tar, archive)
    db_file = sqlite_path(settings)
    if manifest["database"] and db_file is None:
        raise BackupError(
            "the archive holds a SQLite database but database_url is not SQLite: restore into a "
            "SQLite server, or restore PostgreSQL with pg_restore and the archive's blobs with "
            "a --blobs-only backup"
        )
    data_dir, blob_dir = settings.data_dir, settings.blob_path()
    targets: list[tuple[tarfile.TarInfo, Path]] = []  # every member checked before anything is written
    for member in tar.getmembers():
        name = member.name
        if name == DATABASE and db_file is not None:
            targets.append((member, db_file))
        elif name == JWT_SECRET:
            targets.append((member, data_dir / JWT_SECRET))
        elif name.startswith(BLOBS + "/") and member.isfile():
            targets.append((member, _blob_target(settings, blob_dir, name, archive)))
    for member, _target in targets:
        if not member.isfile():
            raise BackupError(f"archive member {member.name!r} is not a plain file")
    busy = [p for p in (data_dir, blob_dir) if p.is_dir() and any(p.iterdir())]
    if db_file is not None and db_file.exists():
        busy.append(db_file)
    if busy and not force:
        raise BackupError(
            f"{busy[0]} is not empty: restore into an empty data folder, or pass --force to replace "
            "its database and blobs"
        )
    if force:
        _clear(db_file, blob_dir, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    blob_dir.mkdir(parents=True, exist_ok=True)
    blobs = 0
    for member, target in targets:
        _extract(tar, member, target)
        blobs += member.name.startswith(BLOBS + "/")
    return Summary(bool(manifest["database"]), blobs)


def _manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, object]:
    try:
        member = tar.getmember(MANIFEST)
        handle = tar.extractfile(member)
        manifest = json.loads(handle.read()) if handle is not None else None
    except (KeyError, ValueError, tarfile.TarError, OSError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{archive}: not a vserver backup (no {MANIFEST} of format {FORMAT})")
    return manifest


def _blob_target(settings: Settings, blob_dir: Path, name: str, archive: Path) -> Path:
    if settings.blobs.s3 is not None:
        raise BackupError(
            f"{archive} holds blob files but {_in_bucket(settings)}: restore it into a server with the "
            "filesystem blob store, then copy the files to the bucket"
        )
    return _inside(blob_dir, name[len(BLOBS) + 1 :], name)


def _inside(root: Path, relative: str, name: str) -> Path:
    """`root / relative` for a relative path that stays inside root; anything else (absolute, `..`, empty)
    is refused: an archive must not write outside the blob folder."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or any(p in ("..", "") for p in parts):
        raise BackupError(f"archive member {name!r} is not a path inside the blob folder")
    return root.joinpath(*parts)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """One regular file, by content only: names are mapped by us, never trusted as paths."""
    if not member.isfile():
        raise BackupError(f"archive member {member.name!r} is not a plain file")
    source = tar.extractfile(member)
    if source is None:
        raise BackupError(f"archive member {member.name!r} cannot be read")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out)


def _clear(db_file: Path | None, blob_dir: Path, data_dir: Path) -> None:
    if db_file is not None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_file}{suffix}").unlink(missing_ok=True)
    if blob_dir.is_dir():
        shutil.rmtree(blob_dir)
    (data_dir / JWT_SECRET).unlink(missing_ok=True)
