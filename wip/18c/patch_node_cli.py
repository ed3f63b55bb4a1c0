p = "/work/main/node/vfed/node/cli.py"
s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, old
    s = s.replace(old, new)
rep('''@click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path), help="Node YAML file."
)''', '''@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Node YAML file; VFED_NODE__<KEY> variables override its keys (without it, they are the whole "
    "configuration).",
)''')
rep('''def run(config_path: Path, rotate_key: bool, log_level: str) -> None:''', '''def run(config_path: Path | None, rotate_key: bool, log_level: str) -> None:''')
rep('''        settings = load_settings(config_path)
        asyncio.run(_serve(settings, rotate_key))
    except ConfigError as exc:
        _fail(f"bad configuration {config_path}: {exc}")''', '''        settings = load_settings(config_path, environment=True)
        asyncio.run(_serve(settings, rotate_key))
    except ConfigError as exc:
        _fail(f"bad configuration {config_path or '(environment)'}: {exc}")''')
open(p, "w").write(s)
print("node cli patched")
