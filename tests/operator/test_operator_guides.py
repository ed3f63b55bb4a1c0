"""The operators' guides (docs/operators.md, docs/server-operators.md) against the real command lines and
settings models, so that they cannot drift:
- every `vnode`/`vserver`/`vfed` command line in their code blocks names existing commands, and its options
  and arguments parse with that command's own click parser; `--help` of that command path exits 0;
- every YAML block says what it is on its first line (`# node config`, `# vserver.yaml`,
  `# federation.yaml`) and validates with that model;
- every configuration key the prose names in backquotes (a name with `_` or `.`) is a key of the node's
  settings (operators.md) or of the server's (server-operators.md), and every metric name is one the agent
  exports."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from vfed.client.cli import main as vfed_main
from vfed.node.cli import main as vnode_main
from vfed.node.config import parse_settings
from vfed.node.config_docs import reference_keys
from vfed.node.metrics import NodeMetrics
from vfed.server.cli import main as vserver_main
from vfed.server.config import Settings
from vfed.server.importer import ImportFile

ROOT = Path(__file__).resolve().parents[2]
NODE_GUIDE = ROOT / "docs" / "operators.md"
SERVER_GUIDE = ROOT / "docs" / "server-operators.md"
GUIDES = (NODE_GUIDE, SERVER_GUIDE)
CLIS: dict[str, click.Group] = {"vnode": vnode_main, "vserver": vserver_main, "vfed": vfed_main}
SEPARATORS = {"&&", "||", ";", "|"}
REDIRECTS = {"<", ">", ">>", "2>"}
FILE_SUFFIXES = (".sqlite3", ".yaml", ".yml", ".json", ".crt", ".key", ".pem", ".csv", ".parquet", ".md")
KEY_SPAN = re.compile(r"[a-z][a-z0-9_]*(\.(<LABEL>|[a-z][a-z0-9_]*))*")
METRIC_SPAN = re.compile(r"(vnode|vfed_node)_[a-z_]+")


def _text(path: Path) -> str:
    return re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.DOTALL)  # merge notes are not the guide


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [
        (m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    ]


def command_lines(body: str) -> Iterator[tuple[str, list[str], str]]:
    """(program, arguments, the line) of every vnode/vserver/vfed command in a shell block."""
    for line in body.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", segment[0]):  # VAR=value before a command
                segment.pop(0)
            if segment and Path(segment[0]).name in CLIS:
                args, skip = [], False
                for arg in segment[1:]:
                    if skip or arg in REDIRECTS:
                        skip = not skip and arg in REDIRECTS
                        continue
                    args.append(arg)
                yield Path(segment[0]).name, args, line.strip()
            segment = []


def _check_command(program: str, args: list[str], line: str) -> None:
    group: click.Command = CLIS[program]
    ctx = click.Context(group, info_name=program)
    path: list[str] = []
    rest = list(args)
    while isinstance(group, click.Group) and rest and not rest[0].startswith("-"):
        sub = group.get_command(ctx, rest[0])
        assert sub is not None, f"{line!r}: `{program} {' '.join(path)}` has no command {rest[0]!r}"
        path.append(rest.pop(0))
        group = sub
        ctx = click.Context(group, parent=ctx, info_name=path[-1])
    # the command's own parser: unknown options, missing option values, extra arguments
    try:
        _, extra, _ = group.make_parser(ctx).parse_args(list(rest))
    except click.UsageError as exc:
        raise AssertionError(f"{line!r}: {exc.format_message()}") from None
    if not isinstance(group, click.Group):
        assert not extra, f"{line!r}: `{program} {' '.join(path)}` takes no more arguments: {extra}"
    done = CliRunner().invoke(CLIS[program], [*path, "--help"])
    assert done.exit_code == 0, f"{program} {' '.join(path)} --help: {done.output}"


def _lines(path: Path) -> list[tuple[str, list[str], str]]:
    found = []
    for lang, body in code_blocks(_text(path)):
        if lang in ("sh", ""):
            found.extend(command_lines(body))
    return found


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_command_line_in_the_guide_parses(guide: Path) -> None:
    lines = _lines(guide)
    assert len(lines) >= 15, [line for _, _, line in lines]  # the guide shows its commands
    for program, args, line in lines:
        _check_command(program, args, line)


def test_the_guides_cover_the_operators_commands() -> None:
    shown = {(p, " ".join(a[:2])) for guide in GUIDES for p, a, _ in _lines(guide)}
    shown |= {(p, a[0]) for p, a in {(p, tuple(a)) for guide in GUIDES for p, a, _ in _lines(guide)} if a}
    wanted = [
        ("vnode", "new"), ("vnode", "keys show"), ("vnode", "keys rotate"), ("vnode", "trust"),
        ("vnode", "datasets register"), ("vnode", "leases grant"), ("vnode", "start"), ("vnode", "stop"),
        ("vnode", "image build"), ("vfed", "demo"),
        ("vserver", "user create"), ("vserver", "user reset-password"), ("vserver", "user list"),
        ("vserver", "organization create"), ("vserver", "collaboration create"), ("vserver", "import"),
        ("vserver", "backup"), ("vserver", "db upgrade"),
    ]  # fmt: skip
    assert [w for w in wanted if w not in shown] == []


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("vnode frobnicate hospital-a", "has no command 'frobnicate'"),
        ("vserver user create alice --organization x --colour red", "No such option"),
        ("vnode keys show hospital-a extra", "takes no more arguments"),
        ("vserver user create alice --organization", "requires an argument"),
    ],
)
def test_the_checker_refuses_what_does_not_exist(line: str, says: str) -> None:
    """The checker itself refuses what does not exist (else the tests above could not fail)."""
    [(program, args, text)] = list(command_lines(line))
    with pytest.raises(AssertionError, match=says):
        _check_command(program, args, text)


def test_command_lines_are_found_in_shell_syntax() -> None:
    body = (
        "VFED_KEY_PASS=x vnode keys generate a --force   # comment\n"
        "vnode stop a && /opt/vfed/bin/vnode clean a\n"
        "vserver user create alice --organization a --password-file - < alice.pw\n"
        "vnode leases grant --dataset p \\\n    --to b --expires 30d --identity k a\n"
    )
    found = [(p, a) for p, a, _ in command_lines(body)]
    assert found == [
        ("vnode", ["keys", "generate", "a", "--force"]),
        ("vnode", ["stop", "a"]),
        ("vnode", ["clean", "a"]),
        ("vserver", ["user", "create", "alice", "--organization", "a", "--password-file", "-"]),
        (
            "vnode",
            ["leases", "grant", "--dataset", "p", "--to", "b", "--expires", "30d", "--identity", "k", "a"],
        ),
    ]


def _validate_yaml(kind: str, data: Any) -> None:
    if kind == "# node config":
        parse_settings({"api_key": "1.secret", "data_dir": "/var/lib/vfed", **data})
    elif kind == "# vserver.yaml":
        Settings.model_validate(data)
    elif kind == "# federation.yaml":
        ImportFile.model_validate(data)
    else:
        raise AssertionError(f"a YAML block must say what it is on its first line, not {kind!r}")


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_yaml_block_validates_with_its_model(guide: Path) -> None:
    blocks = [body for lang, body in code_blocks(_text(guide)) if lang == "yaml"]
    assert blocks
    for body in blocks:
        _validate_yaml(body.splitlines()[0].strip(), yaml.safe_load(body))


def _model_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key
        yield f"{key}_file"  # every secret may come from a file; a non-secret `_file` does not occur
        annotation = field.annotation
        for inner in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from _model_keys(inner, f"{key}.")


def _node_keys() -> set[str]:
    """Every dotted key, and the keys of an image rule by themselves (`max_run_time_s` of a rule)."""
    paths = [key.path for key in reference_keys()]
    return set(paths) | {p.split("[].")[-1] for p in paths if "[]." in p}


def _spans(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", _text(path), flags=re.DOTALL | re.MULTILINE)
    return re.findall(r"`([^`\n]+)`", text)


@pytest.mark.parametrize(
    ("guide", "known"),
    [(NODE_GUIDE, _node_keys), (SERVER_GUIDE, lambda: set(_model_keys(Settings)))],
    ids=["operators.md", "server-operators.md"],
)
def test_every_configuration_key_named_exists(guide: Path, known: Any) -> None:
    keys = known()
    named = [
        s
        for s in _spans(guide)
        if KEY_SPAN.fullmatch(s) and ("_" in s or "." in s) and not s.endswith(FILE_SUFFIXES)
        and not METRIC_SPAN.fullmatch(s)
    ]  # fmt: skip
    assert named
    assert [s for s in named if s not in keys] == []


def test_every_metric_named_is_exported() -> None:
    metrics = NodeMetrics()
    metrics.runs.labels(status="completed").inc()
    exported = {
        line.split()[2] for line in metrics.render().decode().splitlines() if line.startswith("# TYPE")
    }
    exported |= {f"{name}_total" for name in exported}
    named = [s for s in _spans(NODE_GUIDE) if METRIC_SPAN.fullmatch(s)]
    assert named
    assert [s for s in named if s not in exported] == []
