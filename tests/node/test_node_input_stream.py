"""A run's input is decrypted file to file in the run folder and its checks read only the TaskInput's header
(vfed.node.run_input, vfed.node.input_header): a 64 MiB input in a process of its own grows its memory by a
fraction of that, and the header reader agrees with the full parse on what the checks read."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from tests import infra

from vfed.common.crypto import OrgKey, encrypt_file
from vfed.common.payload import TaskInput
from vfed.node.input_header import InputFormatError, LargeValue, read_header
from vfed.node.run_input import RunInput

MIB = 1024 * 1024
GROWTH_MIB = 24  # the in-memory path held the envelope, the plaintext and the parsed JSON: several times 64


def test_a_64_mib_input_is_decrypted_in_bounded_memory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    with plain.open("w") as fh:  # the big argument: a list of numbers and a string, 64 MiB in all
        fh.write('{"method":"fit","args":[[')
        fh.write(",".join(["12345.678"] * (3 * MIB)))
        fh.write('],"' + "x" * (34 * MIB) + '"],"kwargs":{"epsilon":0.5,"data":"' + "y" * MIB + '"}}')
    node, sender = OrgKey.generate(), OrgKey.generate()
    context = b"run-input-context"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    encrypt_file(plain, run_dir / "input.sealed", sender, [node.public], context=context)
    spec = {
        "sealed": str(run_dir / "input.sealed"),
        "x25519": node.x25519_secret.hex(),
        "ed25519": node.ed25519_seed.hex(),
        "sender": sender.public.to_text(),
        "context": context.hex(),
    }
    got = infra.json_child("tests.node.input_kit", json.dumps(spec), "the input's decryption")
    assert got["size"] == plain.stat().st_size >= 64 * MIB
    assert (run_dir / "input").read_bytes() == plain.read_bytes()
    assert got["method"] == "fit" and got["epsilon"] == 0.5 and got["large"] and not got["sealed_left"]
    assert got["growth_mib"] < GROWTH_MIB, got


@pytest.mark.parametrize(
    "document",
    [
        TaskInput(method="m", args=[1, [2, {"a": "]}"}]], kwargs={"epsilon": 1e-3, "k": {"x": [1, '"\\']}}),
        TaskInput(method="m"),
        TaskInput(method='\u00e9\\"', kwargs={"": None, "t": True, "s": 'a"b\\\\c\u2603'}),
    ],
)
async def test_the_header_is_what_the_full_parse_says(document: TaskInput) -> None:
    raw = document.to_json()
    header = read_header(io.BytesIO(b" \n" + raw + b"\n"))
    assert header.method == document.method and header.kwargs == document.kwargs and header.args == []
    assert (await RunInput.of(raw).header()) == document


def test_big_values_are_not_loaded_and_duplicates_take_the_last() -> None:
    raw = b'{"kwargs":{"epsilon":5,"big":"' + b"z" * (70 * 1024) + b'"},"method":"a","method":"b",'
    raw += b'"kwargs":{"epsilon":0.25,"big":[' + b"1," * 40000 + b"1]}}"
    header = read_header(io.BytesIO(raw))
    assert header.method == "b" and header.kwargs["epsilon"] == 0.25
    assert isinstance(header.kwargs["big"], LargeValue)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"method":"m","extra":1}',
        b'{"method":"m","args":{}}',
        b'{"method":"m","kwargs":[]}',
        b'{"method":"m","args":[1,2}',
        b'{"method":"m","args":["unclosed]}',
        b'{"method":"m"} trailing',
        b'{"method":"m","kwargs":{"e":tru}}',
        b'{"kwargs":{}}',
        b'{"method":"m",}',
        b'{"method":' + b'"' + b"m" * (70 * 1024) + b'"}',
    ],
)
def test_what_is_not_a_task_input_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):  # InputFormatError, or pydantic's ValidationError for a wrong field
        read_header(io.BytesIO(raw))
    assert issubclass(InputFormatError, ValueError)
