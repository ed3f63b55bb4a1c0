"""A dataset's content hash and its metadata (schema, row count, column summaries), sealed to lease holders.

The metadata travels in a lease's `metadata` field as
`{"format": "vfed.sealed-metadata/1", "sealed": <base64 envelope>}`: one envelope (vfed.common.crypto,
docs/crypto.md) of the metadata's JSON, signed by the org admin who granted the lease, sealed to every
recipient's key and bound to the collaboration and the dataset's registration, so it cannot be moved into a
lease on another dataset. Only lease holders and the owner can read it; anyone can
see who the recipients are (their key ids are in the envelope's header).

Content hash: a file dataset (csv, parquet, sqlite, ...) hashes its bytes (SHA-256); a folder hashes the
sorted list of `relative path NUL file SHA-256 LF` lines; a SQLAlchemy URL (`sql`) has none (a live database
has no fixed content).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vfed.common.crypto import (
    CryptoError,
    Keyring,
    NotARecipient,
    OrgKey,
    PublicKey,
    SenderLookup,
    decrypt_bytes,
    encrypt_bytes,
)
from vfed.common.ledger.kinds import LeaseGranted

if TYPE_CHECKING:
    import pandas as pd

    from vfed.common.ledger.state import Lease, LedgerState

METADATA_FORMAT: Literal["vfed.dataset-metadata/1"] = "vfed.dataset-metadata/1"
SEALED_FORMAT = "vfed.sealed-metadata/1"
_CONTEXT_DOMAIN = b"vfed/dataset-metadata/v1\x00"
_CHUNK_BYTES = 1 << 20
TABLE_TYPES = ("csv", "parquet", "sqlite")
"""Dataset types whose metadata is computed here (as the algorithm SDK reads them)."""


class MetadataError(Exception):
    """Metadata cannot be computed, sealed or opened; `reason` says which."""

    def __init__(self, message: str, reason: str = "metadata-invalid") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class ColumnSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: str = Field(description="the column's type as the SDK reads it (pandas dtype)")
    kind: Literal["numeric", "categorical"]
    missing: int = Field(ge=0)
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    distinct: int | None = Field(default=None, ge=0, description="categorical columns: distinct values")


class DatasetMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["vfed.dataset-metadata/1"] = METADATA_FORMAT
    label: str
    type: str
    rows: int = Field(ge=0)
    columns: list[ColumnSummary]
    content_hash: str | None = None
    computed_at: int


# -- content hash --------------------------------------------------------------------------------------------
def dataset_path(uri: str) -> Path:
    """The local path of a file dataset's URI (`file://...` or a plain path)."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path) if parsed.scheme == "file" else uri)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(uri: str, dataset_type: str) -> str | None:
    """SHA-256 of the dataset's content (see the module's docstring); None for a database URL.
    MetadataError when the file cannot be read."""
    if dataset_type == "sql":
        return None
    path = dataset_path(uri)
    try:
        if path.is_dir():
            lines = sorted(
                f"{p.relative_to(path).as_posix()}\0{_file_sha256(p)}\n"
                for p in path.rglob("*")
                if p.is_file()
            )
            return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
        return _file_sha256(path)
    except OSError as exc:
        raise MetadataError(f"cannot read {path}: {exc.strerror or exc}", "unreadable") from None


# -- computing -----------------------------------------------------------------------------------------------
def _read_frame(uri: str, dataset_type: str) -> pd.DataFrame:
    try:
        import pandas as pd
    except ImportError:
        raise MetadataError(
            "computing dataset metadata needs pandas and pyarrow (pip install 'vfed[algorithms]')",
            "unavailable",
        ) from None
    path = dataset_path(uri)
    if dataset_type == "csv":
        return pd.read_csv(path)
    if dataset_type == "parquet":
        return pd.read_parquet(path, engine="pyarrow")
    if not path.is_file():
        raise MetadataError(f"sqlite database {path} does not exist", "unreadable")
    connection = sqlite3.connect("file:" + quote(str(path.resolve())) + "?mode=ro", uri=True)
    try:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if len(tables) != 1:
            raise MetadataError(
                f"sqlite database {path} holds tables {tables}: metadata is computed for a single table",
                "unsupported",
            )
        return pd.read_sql_query(f'SELECT * FROM "{tables[0]}"', connection)
    finally:
        connection.close()


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _summary(name: str, column: pd.Series[Any]) -> ColumnSummary:
    from pandas.api import types

    missing = int(column.isna().sum())
    numeric = types.is_numeric_dtype(column.dtype) and not types.is_bool_dtype(column.dtype)
    if numeric:
        present = column.dropna()
        empty = present.empty
        return ColumnSummary(
            name=name,
            type=str(column.dtype),
            kind="numeric",
            missing=missing,
            min=None if empty else _finite(present.min()),
            max=None if empty else _finite(present.max()),
            mean=None if empty else _finite(present.mean()),
        )
    return ColumnSummary(
        name=name,
        type=str(column.dtype),
        kind="categorical",
        missing=missing,
        distinct=int(column.nunique(dropna=True)),
    )


def compute_metadata(
    label: str, uri: str, dataset_type: str, *, content: str | None = None, now: float | None = None
) -> DatasetMetadata:
    """Schema, row count and per-column summaries of a csv, parquet or single-table sqlite dataset, read as
    the algorithm SDK reads it; MetadataError for other types or an unreadable file."""
    if dataset_type not in TABLE_TYPES:
        raise MetadataError(
            f"metadata is computed for {', '.join(TABLE_TYPES)} datasets, not {dataset_type!r}", "unsupported"
        )
    try:
        frame = _read_frame(uri, dataset_type)
    except MetadataError:
        raise
    except Exception as exc:  # pandas and pyarrow raise many types
        raise MetadataError(f"cannot read dataset {label!r} ({dataset_type}): {exc}", "unreadable") from None
    return DatasetMetadata(
        label=label,
        type=dataset_type,
        rows=len(frame),
        columns=[_summary(str(name), frame[name]) for name in frame.columns],
        content_hash=content,
        computed_at=int(time.time() if now is None else now),
    )


# -- sealing and opening -------------------------------------------------------------------------------------
def metadata_context(collaboration_id: int, dataset_digest: str) -> bytes:
    """What the envelope is bound to: this collaboration's registration of the dataset."""
    return _CONTEXT_DOMAIN + f"{collaboration_id}:{dataset_digest}".encode("ascii")


def seal_metadata(
    metadata: DatasetMetadata,
    sender: OrgKey,
    recipients: list[PublicKey],
    *,
    collaboration_id: int,
    dataset_digest: str,
) -> dict[str, str]:
    """The lease's `metadata` field: the metadata sealed to each recipient (duplicates dropped)."""
    unique = list({key.key_id: key for key in recipients}.values())
    if not unique:
        raise MetadataError("the metadata has no recipient", "no-recipient")
    plain = metadata.model_dump_json().encode("utf-8")
    envelope = encrypt_bytes(
        plain, sender, unique, context=metadata_context(collaboration_id, dataset_digest)
    )
    return {"format": SEALED_FORMAT, "sealed": base64.b64encode(envelope).decode("ascii")}


def open_metadata(
    lease: Lease | LeaseGranted, keyring_or_key: Keyring | OrgKey, sender_lookup: SenderLookup
) -> DatasetMetadata | None:
    """The lease's dataset metadata, opened with one of the caller's keys; None when the lease carries none.

    `sender_lookup` maps the sealing admin's key id to their public key (`metadata_sender` finds it on a
    verified ledger). MetadataError: `not-a-recipient` (none of the caller's keys may open it), or
    `metadata-invalid` (malformed, bound elsewhere, or its signature does not verify)."""
    body = lease if isinstance(lease, LeaseGranted) else lease.body
    field = body.metadata
    if not field:
        return None
    if field.get("format") != SEALED_FORMAT or not isinstance(field.get("sealed"), str):
        raise MetadataError(f"the lease's metadata is not in the format {SEALED_FORMAT!r}")
    try:
        envelope = base64.b64decode(field["sealed"], validate=True)
    except (binascii.Error, ValueError):
        raise MetadataError("the lease's sealed metadata is not base64") from None
    keyring = keyring_or_key if isinstance(keyring_or_key, Keyring) else Keyring([keyring_or_key])
    context = metadata_context(body.collab, body.dataset)
    try:
        plain = decrypt_bytes(envelope, keyring, sender_lookup, context=context)
    except NotARecipient as exc:
        raise MetadataError(
            f"the lease's metadata is not sealed to this key: {exc}", "not-a-recipient"
        ) from None
    except CryptoError as exc:
        raise MetadataError(f"the lease's sealed metadata does not open: {exc}") from None
    try:
        return DatasetMetadata.model_validate(json.loads(plain))
    except (ValueError, ValidationError) as exc:
        raise MetadataError(f"the lease's metadata is malformed: {exc}") from None


def metadata_sender(state: LedgerState, lease: Lease) -> PublicKey | None:
    """The key of the admin who granted `lease` (their certificate on the verified ledger): the sender the
    lease's sealed metadata must be signed by."""
    for entry in state.certificates(lease.owner):
        if entry.digest == lease.body.by.certificate:
            try:
                return PublicKey.from_text(str(entry.body.get("key")))
            except CryptoError:
                return None
    return None


__all__ = [
    "METADATA_FORMAT",
    "SEALED_FORMAT",
    "TABLE_TYPES",
    "ColumnSummary",
    "DatasetMetadata",
    "MetadataError",
    "compute_metadata",
    "content_hash",
    "dataset_path",
    "metadata_context",
    "metadata_sender",
    "open_metadata",
    "seal_metadata",
]
