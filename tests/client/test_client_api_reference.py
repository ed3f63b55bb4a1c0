"""docs/client-api.md is generated from the client's code and docstrings, and kept current."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfed.client import api_docs

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "client-api.md"


def test_the_api_reference_is_current() -> None:
    assert api_docs.main(["--check", str(REFERENCE)]) == 0, (
        "run: python -m vfed.client.api_docs --write docs/client-api.md"
    )


def test_every_exported_method_is_in_the_reference() -> None:
    text = REFERENCE.read_text()
    for heading in ("async AsyncClient.create_task(", "Client.results(", "ResultSet.to_dataframe("):
        assert f"### `{heading}" in text


def test_a_public_method_without_a_docstring_fails_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    def undocumented(self: object) -> None:
        pass

    monkeypatch.setattr(api_docs.vfed.client.ResultSet, "undocumented", undocumented, raising=False)
    with pytest.raises(api_docs.Undocumented, match=r"ResultSet\.undocumented"):
        api_docs.render()
