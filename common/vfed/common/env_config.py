"""Settings layered from three places: a config file, the environment, command-line flags (which win, in that
order), with `<key>_file` variants of secret keys read from files.

Why the environment: containers get their configuration from the orchestrator (`docker run -e`, a Kubernetes
`env:`), not from a file baked into the image. Why files for secrets: environment variables show in
`docker inspect` and /proc/<pid>/environ, while Docker and Kubernetes secrets arrive as mounted files (see
vfed.common.secret_file). The variable names come from the pydantic model itself, through pydantic-settings'
EnvSettingsSource: `<PREFIX><KEY>`, nested keys joined by `__` (`VFED_SERVER__MQTT__URL`), lists and mappings
as JSON (`VFED_SERVER__TRUSTED_PROXIES='["10.0.0.0/8"]'`). A key added to a model is reachable at once.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union, cast, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsError

from vfed.common.secret_file import SecretFileError, read_secret_file

SECRET: dict[str, Any] = {"secret": True}
"""`Field(json_schema_extra=SECRET)`: the key may also be given as `<key>_file`, a file holding the value
(SecretStr fields are secret without the marker)."""

FILE_SUFFIX = "_file"
NESTING = "__"


class LayerError(Exception):
    """A setting from the environment or a secret file that cannot be used; one line naming the variable or
    key and the problem."""


def is_secret(field: FieldInfo) -> bool:
    """True for fields marked SECRET or typed SecretStr (optionally None)."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get("secret") is True:
        return True
    return field.annotation is SecretStr or SecretStr in get_args(field.annotation)


def _nested_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model class of a nested-model field (`mqtt: MqttSettings`, or `X | None`), else None."""
    candidates = [field.annotation]
    if get_origin(field.annotation) in (Union, types.UnionType):
        candidates = list(get_args(field.annotation))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def from_environment(model: type[BaseModel], prefix: str) -> dict[str, Any]:
    """The raw (unvalidated) values the environment gives `model`, as nested dicts.

    Variables are matched without regard to case, so keys arrive lower-cased (a dataset label too). A
    variable with the prefix that names no key of the model is refused, not ignored: a typo would otherwise
    leave a default in place unnoticed.
    """
    source = EnvSettingsSource(
        cast("type[BaseSettings]", model),  # the source reads only model_fields and model_config
        env_prefix=prefix,
        env_nested_delimiter=NESTING,
        case_sensitive=False,
    )
    try:
        raw: dict[str, Any] = dict(source())
    except SettingsError as exc:  # a list or mapping that is not JSON
        field = re.search(r'field "([^"]+)"', str(exc))
        name = env_name(prefix, (field.group(1),)) if field else prefix + "*"
        raise LayerError(f"{name}: not valid JSON (lists and mappings are given as JSON)") from None
    for name, value in os.environ.items():
        if not name.upper().startswith(prefix.upper()):
            continue
        head = name[len(prefix) :].lower().split(NESTING, 1)[0]
        if head in model.model_fields:
            continue
        base = head.removesuffix(FILE_SUFFIX)
        if head.endswith(FILE_SUFFIX) and base in model.model_fields and is_secret(model.model_fields[base]):
            raw[head] = value  # a secret's file at the top level (nested ones arrive inside their dict)
            continue
        raise LayerError(f"{name}: {head!r} is not a setting")
    return raw


def resolve_secret_files(
    model: type[BaseModel],
    raw: dict[str, Any],
    describe: Callable[[str], str],
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """`raw` with every `<secret>_file` key replaced by `<secret>` read from that file (nested models too).

    `describe(dotted_key)` names a key for messages (a file's key or an environment variable). Both the key
    and its `_file` in one layer is refused; across layers the higher layer wins as for any key.
    """
    out = dict(raw)
    for key, value in raw.items():
        field = model.model_fields.get(key)
        nested = _nested_model(field) if field is not None else None
        if nested is not None and isinstance(value, dict):
            out[key] = resolve_secret_files(nested, value, _within(describe, key), base_dir)
            continue
        base = key.removesuffix(FILE_SUFFIX)
        if not key.endswith(FILE_SUFFIX) or base not in model.model_fields:
            continue  # (a `<secret>_file` that is a field of its own, like mqtt.password_file, is read too)
        if not is_secret(model.model_fields[base]):
            continue
        if base in raw:
            raise LayerError(f"{describe(key)}: set {base} or {key}, not both")
        path = Path(str(value)).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            out[base] = read_secret_file(path, describe(key))
        except SecretFileError as exc:
            raise LayerError(str(exc)) from None
        del out[key]
    return out


def _within(describe: Callable[[str], str], section: str) -> Callable[[str], str]:
    """Names of a nested section's keys: `mqtt` + `password_file` -> describe("mqtt.password_file")."""
    return lambda key: describe(f"{section}.{key}")


def merge(lower: Mapping[str, Any], higher: Mapping[str, Any]) -> dict[str, Any]:
    """`higher` over `lower`; nested mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(lower)
    for key, value in higher.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            out[key] = merge(below, value)
        else:
            out[key] = value
    return out


def has_path(raw: Mapping[str, Any], path: tuple[str | int, ...]) -> bool:
    """True when `raw` gave the value at a validation error's location (or a whole list or value above it):
    the error then names where that value came from."""
    if not path:
        return False
    node: Any = raw
    for part in path:
        if not isinstance(node, Mapping):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def env_name(prefix: str, path: tuple[str | int, ...]) -> str:
    """The variable that sets a key: ("mqtt", "url") -> VFED_SERVER__MQTT__URL."""
    return prefix + NESTING.join(str(p).upper() for p in path)
