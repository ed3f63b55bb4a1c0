"""A fresh bucket on the session's moto S3 server per test, emptied and removed afterwards, and the blob store
settings that choose the filesystem or that bucket (`blob_backend`, parametrized indirectly)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from minio import Minio
from minio.deleteobjects import DeleteObject
from tests import infra

from vfed.server.config import BlobsSettings, S3Settings

BACKENDS = ["filesystem", "s3"]
both_backends = pytest.mark.parametrize("blob_backend", BACKENDS, indirect=True)


def minio_client(s3: infra.S3Server) -> Minio:
    return Minio(
        f"127.0.0.1:{s3.port}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=False,
        region=s3.region,
    )


def empty_bucket(client: Minio, bucket: str) -> None:
    """Aborts unfinished uploads, removes every object, then the bucket (moto keeps all in memory)."""
    for upload in client._list_multipart_uploads(bucket).uploads:
        client._abort_multipart_upload(bucket, upload.object_name, str(upload.upload_id))
    names = [DeleteObject(str(o.object_name)) for o in client.list_objects(bucket, recursive=True)]
    for error in client.remove_objects(bucket, names):
        raise AssertionError(f"could not empty {bucket}: {error}")
    client.remove_bucket(bucket)


@pytest.fixture
def s3_settings(moto_server: infra.S3Server) -> Iterator[S3Settings]:
    """S3 settings naming a new, empty bucket of its own (path-style, as MinIO and Ceph RGW are used)."""
    client = minio_client(moto_server)
    bucket = f"vfed-{uuid.uuid4().hex[:16]}"
    client.make_bucket(bucket)
    try:
        yield S3Settings(
            endpoint=moto_server.endpoint,
            bucket=bucket,
            region=moto_server.region,
            prefix="blobs/",
            addressing="path",
            access_key_id=moto_server.access_key,
            secret_access_key=moto_server.secret_key,
            part_bytes=5 * 1024 * 1024,
        )
    finally:
        empty_bucket(client, bucket)


@pytest.fixture
def blob_backend(request: pytest.FixtureRequest) -> str:
    """`filesystem` unless a test parametrizes it (indirectly, with `both_backends`)."""
    return str(getattr(request, "param", "filesystem"))


@pytest.fixture
def blobs_settings(request: pytest.FixtureRequest, blob_backend: str) -> BlobsSettings:
    if blob_backend == "s3":
        s3: Any = request.getfixturevalue("s3_settings")
        return BlobsSettings(backend="s3", s3=s3)
    return BlobsSettings()
