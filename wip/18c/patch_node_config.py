p = "/work/main/node/vfed/node/config.py"
s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, old
    s = s.replace(old, new)

rep('''import yaml
from pydantic import (''', '''import yaml
from pydantic import (''')
rep('''_LABEL_RE = re.compile(''', '''from vfed.common.env_config import (
    LayerError,
    env_name,
    from_environment,
    has_path,
    merge,
    resolve_secret_files,
)

ENV_PREFIX = "VFED_NODE__"
_LABEL_RE = re.compile(''')
rep('''def parse_settings(data: Any, *, base_dir: Path | None = None) -> NodeSettings:
    """Validate an already-parsed mapping; relative paths are taken from base_dir."""
    if not isinstance(data, dict):
        raise ConfigError("(top level): the configuration must be a mapping of keys to values")
    try:
        settings = NodeSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
''', '''def parse_settings(
    data: Any, *, base_dir: Path | None = None, env: dict[str, Any] | None = None
) -> NodeSettings:
    """Validate an already-parsed mapping (with `env`, the environment's layer, over it); relative paths
    are taken from base_dir, `<secret>_file` keys read (`api_key_file`)."""
    if not isinstance(data, dict):
        raise ConfigError("(top level): the configuration must be a mapping of keys to values")
    try:
        data = resolve_secret_files(NodeSettings, data, lambda key: key, base_dir)
    except LayerError as exc:
        raise ConfigError(str(exc)) from None
    try:
        settings = NodeSettings.model_validate(merge(data, env or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, env or {})) from None
''')
rep('''def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{key}: {item['msg']}")
    return "; ".join(parts)
''', '''def _describe(error: ValidationError, env: dict[str, Any]) -> str:
    parts = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = env_name(ENV_PREFIX, loc) if has_path(env, loc) else ".".join(str(p) for p in loc)
        parts.append(f"{key or '(top level)'}: {item['msg']}")
    return "; ".join(parts)
''')
rep('''def load_settings(path: Path) -> NodeSettings:
    """Read the YAML file at path; every failure is a ConfigError with one clear message."""
    try:
        text = path.read_text(encoding="utf-8")''', '''def environment_layer() -> dict[str, Any]:
    """What `VFED_NODE__<KEY>` variables set (`__` between nested keys, `<secret>_FILE` for secrets)."""
    try:
        raw = from_environment(NodeSettings, ENV_PREFIX)
        return resolve_secret_files(NodeSettings, raw, lambda k: env_name(ENV_PREFIX, tuple(k.split("."))))
    except LayerError as exc:
        raise ConfigError(str(exc)) from None


def load_settings(path: Path | None, *, environment: bool = False) -> NodeSettings:
    """Read the YAML file at path, and with `environment` the `VFED_NODE__...` variables over it (what `vnode
    run` does; the operator's commands read the file only, as the agent they start does not share their
    environment); every failure is a ConfigError with one clear message."""
    env = environment_layer() if environment else {}
    if path is None:
        return parse_settings({}, env=env)
    try:
        text = path.read_text(encoding="utf-8")''')
rep('''    return parse_settings(data, base_dir=path.resolve().parent)
''', '''    return parse_settings(data, base_dir=path.resolve().parent, env=env)
''')
open(p, "w").write(s)
print("node config patched")
