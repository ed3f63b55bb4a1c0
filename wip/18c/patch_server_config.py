import sys
p = "/work/main/server/vfed/server/config.py"
s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, old
    s = s.replace(old, new)

rep("""from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, ValidationError, model_validator
""", """from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, ValidationError, model_validator
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from vfed.common.env_config import (
    SECRET,
    LayerError,
    env_name,
    from_environment,
    has_path,
    merge,
    resolve_secret_files,
)
""")
rep("""DEFAULT_METRICS_PORT = 7601
""", """DEFAULT_METRICS_PORT = 7601
ENV_PREFIX = "VFED_SERVER__"
""")
rep("""    password: str | None = None
    ca_file: Path | None = None""", """    password: str | None = Field(None, json_schema_extra=SECRET, description="or password_file")
    ca_file: Path | None = None""")
rep("""    database_url: str | None = Field(None, description="SQLAlchemy async URL; default SQLite in data_dir")
""", """    database_url: str | None = Field(None, description="SQLAlchemy async URL; default SQLite in data_dir")
    database_password: str | None = Field(
        None,
        json_schema_extra=SECRET,
        description="the password for database_url, kept out of it (usually database_password_file)",
    )
""")
rep("""    jwt_secret: str = Field(default_factory=lambda: secrets.token_urlsafe(32), min_length=16)
""", """    jwt_secret: str = Field(
        default_factory=lambda: secrets.token_urlsafe(32), min_length=16, json_schema_extra=SECRET
    )
""")
rep("""    auto_migrate: bool = True
""", """    auto_migrate: bool = Field(
        False,
        description="migrate an older schema at start, as `vserver start --upgrade` does; an empty database "
        "always gets the newest schema",
    )
""")
rep('''    def db_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data folder."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'vserver.sqlite'}"
''', '''    @model_validator(mode="after")
    def _one_database_password(self) -> Settings:
        if self.database_password is None:
            return self
        if self.database_url is None:
            raise ValueError("database_password needs a database_url (the SQLite default has no password)")
        try:
            url = make_url(self.database_url)
        except ArgumentError:
            return self  # named when the engine is made (vfed.server.db.open_engine)
        if url.password is not None:
            raise ValueError("database_url holds a password and database_password is set too: keep one")
        return self

    def db_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data folder; database_password goes in here,
        so it never has to be written into the URL of a config file or variable."""
        if self.database_url is None:
            return f"sqlite+aiosqlite:///{self.data_dir / 'vserver.sqlite'}"
        if self.database_password is None:
            return self.database_url
        url = make_url(self.database_url).set(password=self.database_password)
        return url.render_as_string(hide_password=False)
''')
old_load = s[s.index("def load_settings(path: Path | None, **overrides: Any) -> Settings:"):]
rep(old_load, '''def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Settings from three layers, each over the one before: the YAML file (if given), the environment
    (`VFED_SERVER__<KEY>`, `__` between nested keys), then non-None `overrides` (command-line flags).
    A secret key may come as `<key>_file` in the file or the environment (vfed.common.env_config)."""
    try:
        file_layer = _file_layer(path)
        env_layer = resolve_secret_files(Settings, from_environment(Settings, ENV_PREFIX), _env_key)
    except LayerError as exc:
        raise ConfigError(str(exc)) from None
    flags = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings.model_validate(merge(merge(file_layer, env_layer), flags))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, env_layer, flags)) from None


def _env_key(dotted: str) -> str:
    return env_name(ENV_PREFIX, tuple(dotted.split(".")))


def _file_layer(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return resolve_secret_files(Settings, loaded or {}, lambda key: f"{path}: {key}")


def _describe(exc: ValidationError, path: Path | None, env: dict[str, Any], flags: dict[str, Any]) -> str:
    """One part per problem, each naming where the value came from: a flag's key, the environment variable,
    or the file and its dotted key."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if has_path(flags, loc):
            parts.append(f"{key}: {err['msg']}")
        elif has_path(env, loc):
            parts.append(f"{env_name(ENV_PREFIX, loc)}: {err['msg']}")
        else:
            parts.append((f"{path}: " if path else "") + f"{key}: {err['msg']}")
    return "; ".join(parts)
''')
open(p, "w").write(s)
print("server config patched")
