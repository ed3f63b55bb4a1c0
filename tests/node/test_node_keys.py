"""The agent's key holder and the journal's memory of executed descriptors: plain files, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfed.common.crypto import Keyring
from vfed.node.journal import Journal
from vfed.node.keys import KeyHolder, KeyMismatch


def test_the_key_holder_takes_a_rotated_file_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    path = tmp_path / "org-key.json"
    keyring = Keyring.generate()
    keyring.save(path)
    holder = KeyHolder(path, None, Keyring.load(path))
    assert not holder.changed()
    assert holder.reload() is None  # the same keys: nothing to do
    keyring.rotate()
    keyring.save(path)
    assert holder.changed()
    reloaded = holder.reload()
    assert reloaded is not None and holder.current.key_id == keyring.current.key_id
    assert [k.key_id for k in holder.keyring.keys] == [k.key_id for k in keyring.keys]
    assert holder.root.key_id == keyring.keys[0].key_id and not holder.changed()
    Keyring.generate().save(path)  # another organization's key file, copied over ours
    with pytest.raises(KeyMismatch, match="no longer holds this node's keys"):
        holder.reload()
    assert holder.current.key_id == keyring.current.key_id  # the keys loaded before stay
    Keyring(keyring.keys[:1]).save(path)  # an old copy that lost the new key
    with pytest.raises(KeyMismatch):
        holder.reload()


def test_the_journal_refuses_a_descriptor_another_run_executed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        assert journal.accept_descriptor("d" * 64, "s:1", expires_at=2000.0, now=1000.0) is None
        assert journal.accept_descriptor("d" * 64, "s:1", expires_at=2000.0, now=1001.0) is None  # resumed
        assert journal.accept_descriptor("d" * 64, "s:2", expires_at=2000.0, now=1002.0) == "s:1"
        assert journal.accepted_descriptor("s:1") == ("d" * 64, 1000.0)
        assert journal.accepted_descriptor("s:2") is None  # a refused replay is not remembered
        assert journal.accept_descriptor("e" * 64, "s:3", expires_at=3000.0, now=1003.0) is None
        # Once expired, an entry is purged (the descriptor itself is refused as expired by then).
        assert journal.accept_descriptor("d" * 64, "s:4", expires_at=4000.0, now=2001.0) is None
        assert journal.accepted_descriptor("s:1") is None
        assert journal.accepted_descriptor("s:3") == ("e" * 64, 1003.0)
    finally:
        journal.close()
