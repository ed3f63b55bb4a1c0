"""The federation file as `vnode trust import` and `vfed trust import` read it, and the pins made from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfed.common.crypto import Keyring
from vfed.common.trust import TrustStore, fingerprint
from vfed.common.trust.truststore import (
    FederationEntry,
    FederationFileError,
    pin_named,
    read_federation_file,
)


def _key_id() -> str:
    return Keyring.generate().current.key_id


def test_read_keeps_names_in_order_and_ignores_other_keys(tmp_path: Path) -> None:
    a, b = Keyring.generate().current.public, _key_id()
    path = tmp_path / "federation.yaml"
    path.write_text(
        "organizations:\n"
        f"  - {{name: alpha, fingerprint: {fingerprint(a)}, public_key: x}}\n"
        "  - {name: beta}\n"
        f"  - {{name: beta, fingerprint: '{b.upper()}'}}\n"  # a second entry may add the fingerprint
        "  - {name: alpha}\n"
        "users: [{username: u, password: secret-secret, organization: alpha}]\n"
    )
    assert read_federation_file(path) == [FederationEntry("alpha", a.key_id), FederationEntry("beta", b)]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("organizations: [{fingerprint: x}]", "organizations.0: an organization needs a name"),
        ("organizations: [{name: a, fingerprint: 12345678901234567890123456789012}]", "in quotes"),
        ("organizations: [{name: a, fingerprint: zz}]", "organizations.0 (a): 'zz' is not a key fingerprint"),
        ("[1, 2]", "expected `organizations:"),
    ],
)
def test_read_refuses_with_the_entry(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(text)
    with pytest.raises(FederationFileError) as caught:
        read_federation_file(path)
    assert needle in str(caught.value)


def test_read_refuses_two_fingerprints_for_one_name(tmp_path: Path) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(
        f"organizations: [{{name: a, fingerprint: {_key_id()}}}, {{name: a, fingerprint: {_key_id()}}}]"
    )
    with pytest.raises(FederationFileError, match=r"organizations\.1: organization 'a' is listed with two"):
        read_federation_file(path)


def test_pin_named_writes_nothing_when_one_conflicts(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trusted_orgs")
    first, second, third = _key_id(), _key_id(), _key_id()
    store.pin(2, first, note="by the admin")
    done = pin_named(store, [("a", 1, third), ("b", 2, first)], "from the file")
    assert [(d.name, d.new) for d in done] == [("a", True), ("b", False)]
    assert done[1].pin.note == "by the admin"  # an existing pin to the same key stays as it was
    before = store.path.read_text() if store.path else ""
    with pytest.raises(FederationFileError, match="organization 2 \\(b\\) is pinned to"):
        pin_named(store, [("c", 3, third), ("b", 2, second)], "from the file")
    with pytest.raises(FederationFileError, match="'c' and 'd' are both organization 3"):
        pin_named(store, [("c", 3, third), ("d", 3, second)], "from the file")
    assert store.path is not None and store.path.read_text() == before and store.get(3) is None
