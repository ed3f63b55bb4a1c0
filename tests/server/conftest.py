"""Fixtures every server test module may use without importing them: the blob store choice (s3_testkit)."""

from s3_testkit import blob_backend, blobs_settings, s3_settings

__all__ = ["blob_backend", "blobs_settings", "s3_settings"]
