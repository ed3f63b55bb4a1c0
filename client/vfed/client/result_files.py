"""Results streamed to files: a run's sealed result goes from the server to a partial file, is decrypted
chunk by chunk into its final file as it arrives (the decryption follows the download through the partial
file, so the bytes are read once, from the page cache), and only then is the partial removed, so memory
stays at a few chunks whatever the result's size and a broken transfer resumes where it stopped, in this call
or the next.

The checks are those of results kept in memory: bound to the run, signed by a key of the executing
organization's verified chain (read again once when the key is newer than the chain kept).
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vfed.client.errors import ResultMismatch
from vfed.client.http import file_size
from vfed.client.results import NOT_LOADED
from vfed.common.api.resources import Run
from vfed.common.crypto import (
    ContextMismatch,
    CryptoError,
    Keyring,
    SenderLookup,
    UnknownSender,
    decrypt_fileobj,
)
from vfed.common.growing_file import GrowingFile
from vfed.common.payload import PARQUET_MAGIC, AlgorithmError, PayloadError, decode_result
from vfed.common.trust import KeyChain, result_context

if TYPE_CHECKING:
    from vfed.client.client import AsyncClient

T = TypeVar("T")
STREAMS_AT_ONCE = 4  # results streamed to files at the same time: each holds a few chunks in memory
JSON_PREFIX = b'{"vfed":1,"format":"json","value":'  # how vfed.common.payload.encode_result starts a value
EAGER_MAX_BYTES = 16 * 1024 * 1024  # other layouts are decoded at once (error documents) only up to this


def result_name(organization_id: int, run_id: int, kind: str) -> str:
    """The final file's name: `organization-<org id>-run-<run id>.<parquet|json>`."""
    return f"organization-{organization_id}-run-{run_id}.{kind}"


def sealed_name(organization_id: int, run_id: int) -> str:
    """The partial file of the sealed result, kept between calls until it decrypts."""
    return f"organization-{organization_id}-run-{run_id}.sealed.part"


async def open_checked(
    client: AsyncClient,
    run_id: int,
    org_id: int,
    chain: KeyChain,
    opener: Callable[[SenderLookup], Awaitable[T]],
) -> T:
    """`opener` run with the lookup of the organization's chain, and once more with the chain read again
    when the signing key is newer than the chain kept; ResultMismatch when the result is bound to another
    run or task, or signed by a key outside the organization's chain."""
    try:
        try:
            return await opener(chain.lookup())
        except UnknownSender:  # signed by a key newer than the chain we keep: read it again, once
            chain = await client.chains.chain(org_id, refresh=True)
            return await opener(chain.lookup())
    except ContextMismatch:
        raise ResultMismatch(
            run_id, org_id, "belongs to another run or task (not bound to this run)"
        ) from None
    except UnknownSender:
        raise ResultMismatch(run_id, org_id, "is not signed by a key of that organization") from None


async def stream_result(
    client: AsyncClient, run: Run, digest: str | None, folder: Path, limit: asyncio.Semaphore
) -> tuple[Path, Any]:
    """(the final file, its value if read already else NOT_LOADED) for a completed run. A sealed partial
    left by an earlier call is continued; when what it held fails to decrypt, it is fetched whole once
    more before the result is refused (ResultMismatch, no final file, no partial left)."""
    run_id, org_id = run.id, run.organization_id
    context = None if digest is None else result_context(digest, org_id, run_id)
    sealed = folder / sealed_name(org_id, run_id)
    async with limit:
        kept = await asyncio.to_thread(file_size, sealed)
        chain = await client.chains.chain(org_id)
        for again in (False, True):
            # the decryption follows the download through the partial file: one pass over the bytes
            downloaded = threading.Event()
            download = asyncio.ensure_future(client.api.download_blob_to(str(run.result_blob_id), sealed))
            download.add_done_callback(functools.partial(_set_when_done, downloaded))
            decrypt = functools.partial(
                _decrypt_to_file, sealed, downloaded, folder, org_id, run_id, client.keyring, context
            )
            opener = functools.partial(_open_into, decrypt, downloaded)
            try:
                try:
                    if kept and not again:  # an earlier call's partial may yet be dropped (416): wait for it
                        await asyncio.wait([download])
                    found = await open_checked(client, run_id, org_id, chain, opener)
                finally:
                    if not download.done():  # the decryption gave up first: stop the transfer
                        download.cancel()
                    await asyncio.gather(download, return_exceptions=True)
            except (AlgorithmError, PayloadError):  # it decrypted: an error output, not a damaged transfer
                await asyncio.to_thread(sealed.unlink, True)
                raise
            except (ResultMismatch, CryptoError) as exc:
                failed = _failure(download)
                if failed is not None:  # the transfer broke for good: that, not the truncation it caused
                    raise failed from None
                await asyncio.to_thread(sealed.unlink, True)
                if kept and not again:
                    continue  # the bytes kept from an earlier transfer may be the damaged ones
                if isinstance(exc, ResultMismatch):
                    raise
                why = f"does not decrypt ({exc.__class__.__name__}: {exc}): damaged or tampered with"
                raise ResultMismatch(run_id, org_id, why) from None
            failed = _failure(download)
            if failed is not None:
                raise failed
            await asyncio.to_thread(sealed.unlink)
            return found
    raise AssertionError("unreachable: the second attempt returns or raises")


def _set_when_done(event: threading.Event, _done: asyncio.Future[int]) -> None:
    event.set()


def _failure(download: asyncio.Future[int]) -> BaseException | None:
    """The error that ended the download, if it ended in one (a cancellation we asked for is none)."""
    if download.cancelled():
        return None
    return download.exception()


async def _open_into(
    decrypt: Callable[[SenderLookup], tuple[Path, Any]], downloaded: threading.Event, sender: SenderLookup
) -> tuple[Path, Any]:
    """`decrypt` (the partial file's decryption, in a thread) with `sender`; a cancellation ends the
    decryption at what arrived and lets it clean up before it propagates."""
    work = asyncio.ensure_future(asyncio.to_thread(decrypt, sender))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:  # the thread goes on: end it at what arrived and let it clean up first
        downloaded.set()
        await asyncio.gather(work, return_exceptions=True)
        raise


def _decrypt_to_file(
    sealed: Path,
    downloaded: threading.Event,
    folder: Path,
    org_id: int,
    run_id: int,
    keyring: Keyring,
    context: bytes | None,
    sender: SenderLookup,
) -> tuple[Path, Any]:
    """Decrypt into a private temporary file beside the final one, renamed into place only once the
    signature verified and the plaintext is a result; on any error nothing is left."""
    fd, name = tempfile.mkstemp(prefix=f".organization-{org_id}-run-{run_id}.", suffix=".tmp", dir=folder)
    tmp = Path(name)
    try:
        with GrowingFile(sealed, downloaded) as src, os.fdopen(fd, "wb") as out:
            decrypt_fileobj(src, out, keyring, sender, context=context)  # type: ignore[arg-type]
        kind, value = _sniff(tmp)
        final = folder / result_name(org_id, run_id, kind)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final, value


def _sniff(path: Path) -> tuple[str, Any]:
    """("parquet" | "json", NOT_LOADED) for a table or a value in the SDK's layout, read by first and last
    bytes only; anything else up to EAGER_MAX_BYTES (an algorithm's error document, another JSON layout) is
    decoded now, so an error raises AlgorithmError here as it does for results kept in memory."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(len(JSON_PREFIX))
        f.seek(max(size - len(PARQUET_MAGIC), 0))
        tail = f.read()
    if size >= 2 * len(PARQUET_MAGIC) and head.startswith(PARQUET_MAGIC) and tail == PARQUET_MAGIC:
        return "parquet", NOT_LOADED
    if (head == JSON_PREFIX and tail.endswith(b"}")) or size > EAGER_MAX_BYTES:
        return "json", NOT_LOADED  # a big file is no error document: it is read when its value is asked for
    return "json", decode_result(path.read_bytes())
