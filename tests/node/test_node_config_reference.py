"""docs/vnode.md's node configuration reference is what vfed.node.config_docs generates from the models.

Regenerate after changing a settings model: `python -m vfed.node.config_docs --write docs/vnode.md`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from vfed.common.env_config import merge
from vfed.node import config_docs
from vfed.node.config import (
    ENV_PREFIX,
    DatasetConfig,
    ImagePolicy,
    NodeSettings,
    Policies,
    load_settings,
    parse_settings,
)
from vfed.node.runtime.base import RuntimeConfig
from vfed.node.runtime.registry import KINDS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "vnode.md"
REGENERATE = "python -m vfed.node.config_docs --write docs/vnode.md"


def test_the_docs_hold_exactly_the_generated_reference() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert config_docs.current_section(text) == config_docs.render(), (
        f"docs/vnode.md's node configuration reference differs from the settings models: run `{REGENERATE}`"
    )
    assert "the agent's docs" not in text  # the dangling reference it replaced


def test_every_key_of_every_model_is_a_row_with_a_description() -> None:
    rows = {key.path: key for key in config_docs.reference_keys()}
    models: list[tuple[str, type[BaseModel]]] = [
        ("", NodeSettings),
        ("datasets.<LABEL>.", DatasetConfig),
        ("policies.", Policies),
        ("policies.allowed_images[].", ImagePolicy),
        ("runtime.", RuntimeConfig),
        *(("runtime.", entry.config) for entry in KINDS.values()),
    ]
    for prefix, model in models:
        for name in model.model_fields:
            assert f"{prefix}{name}" in rows, f"{model.__name__}.{name} is missing from the reference"
    assert "api_key_file" in rows  # the secret's file variant
    assert [path for path, key in rows.items() if not key.description] == []
    assert [path for path, key in rows.items() if not (key.type and key.default)] == []


def test_a_key_without_a_description_or_a_changed_model_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two checks above can fail: an undocumented key, or a model the docs no longer match."""
    before = config_docs.render()
    monkeypatch.setattr(NodeSettings.model_fields["min_rows"], "description", None)
    assert [key.path for key in config_docs.reference_keys() if not key.description] == ["min_rows"]
    assert config_docs.render() != before


def test_every_key_has_one_example_and_the_models_accept_it(tmp_path: Path) -> None:
    paths = [key.path for key in config_docs.reference_keys()]
    assert sorted(config_docs.EXAMPLES) == sorted(paths)  # none missing, none left over from a removed key
    assert set(config_docs.COMPANIONS) <= set(paths)
    key_file = tmp_path / "api-key"
    key_file.write_text("3.from-a-file\n")
    for path in paths:
        example = config_docs.example_mapping(path)
        base: dict[str, Any] = {"api_key": "1.secret", "data_dir": str(tmp_path / "data")}
        if path == "api_key_file":
            example, base = {"api_key_file": str(key_file)}, {"data_dir": str(tmp_path / "data")}
        parse_settings(merge(base, example))  # the runtime section too: validated by its kind's model
        assert f"`{path}`" in config_docs.render()


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def test_each_environment_variable_named_sets_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variable the reference names for each key (set to the example, its companions to theirs; or the
    JSON of the variable it names the key within) gives the same settings as the example in the file."""
    rows = {key.path: key for key in config_docs.reference_keys()}
    key_file = tmp_path / "api-key"
    key_file.write_text("3.from-a-file\n")
    checked = 0
    for path, key in rows.items():
        for name in list(os.environ):
            if name.upper().startswith(ENV_PREFIX):
                monkeypatch.delenv(name)
        base = {"data_dir": str(tmp_path / "data")}
        if path == "api_key_file":
            values: dict[str, Any] = {path: str(key_file)}
            example: dict[str, Any] = values
        else:
            base["api_key"] = "1.secret"
            values = {**config_docs.COMPANIONS.get(path, {}), path: config_docs.EXAMPLES[path]}
            example = config_docs.example_mapping(path)
        expected = parse_settings(merge(base, example))
        for name, value in base.items():
            monkeypatch.setenv(ENV_PREFIX + name.upper(), value)
        if key.env:
            for dotted, value in values.items():
                variable = rows[dotted].env.replace("<LABEL>", config_docs.LABEL.upper())
                monkeypatch.setenv(variable, _env_value(value))
        else:  # a list item's key: inside the JSON of the variable named
            section: Any = example
            for part in key.within.removeprefix(ENV_PREFIX).lower().split("__"):
                section = section[part]
            monkeypatch.setenv(key.within, json.dumps(section))
        got = load_settings(None, environment=True)
        assert got == expected, f"{key.env} did not set {path}: {got!r} != {expected!r}"
        checked += 1
    assert checked == len(rows) > 60


def test_regenerating_without_make(tmp_path: Path) -> None:
    """`python -m vfed.node.config_docs --write FILE` puts the section between the markers, leaving the rest,
    and says so; a file without the markers is one error line, exit 1."""
    stale = tmp_path / "vnode.md"
    stale.write_text(f"# before\n\n{config_docs.BEGIN}\nold\n{config_docs.END}\n\n## after\n")
    run = subprocess.run(
        [sys.executable, "-m", "vfed.node.config_docs", "--write", str(stale)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert stale.read_text() == "# before\n\n" + config_docs.render() + "\n## after\n"
    printed = subprocess.run(
        [sys.executable, "-m", "vfed.node.config_docs"], capture_output=True, text=True, check=False
    )
    assert printed.stdout == config_docs.render()
    bare = tmp_path / "bare.md"
    bare.write_text("# nothing here\n")
    refused = subprocess.run(
        [sys.executable, "-m", "vfed.node.config_docs", "--write", str(bare)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "markers" in refused.stderr
    assert bare.read_text() == "# nothing here\n"
