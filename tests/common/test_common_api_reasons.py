"""The classified reasons and the sealed run log of `vfed.common.api`: what may leave a node about a run."""

from __future__ import annotations

import base64

import pytest

from vfed.common.api import Reason, RunLogError, algorithm_error, classified, code_of, open_log, seal_log
from vfed.common.api.reasons import type_name
from vfed.common.crypto import Keyring

IDS = {"organization_id": 3, "task_id": 7, "run_id": 11}


def test_an_exception_type_passes_only_when_it_is_a_plain_class_name() -> None:
    assert algorithm_error("ValueError") == "algorithm-error: ValueError"
    assert algorithm_error("pandas.errors.ParserError") == "algorithm-error: pandas.errors.ParserError"
    for shaped in ("bad value 42", "x\ny", "Value'Error", "", "A" * 201, None, 42, "a..b"):
        assert type_name(shaped) is None, shaped
        assert algorithm_error(shaped) == "algorithm-error"


def test_a_detail_is_one_bounded_line_and_the_code_reads_back() -> None:
    reason = classified(Reason.TIMEOUT, "killed:\n ran past\tits limit " + "x" * 1000)
    assert reason.startswith("timeout: killed: ran past its limit ") and "\n" not in reason
    assert len(reason) == len("timeout: ") + 300
    assert classified(Reason.BAD_INPUT) == "bad-input"
    assert code_of("algorithm-error: KeyError") == Reason.ALGORITHM_ERROR
    assert code_of("disclosure-refused") == "disclosure-refused"
    assert code_of(None) is None and code_of("") is None


def test_a_sealed_log_opens_only_for_its_recipients_and_its_run() -> None:
    node, initiator, stranger = Keyring.generate(), Keyring.generate(), Keyring.generate()
    text = "converting S3CR3T\nValueError: bad value S3CR3T\n"
    own_only = seal_log(text, node.current, [node.current.public], **IDS)
    assert b"S3CR3T" not in base64.b64decode(own_only)
    assert open_log(own_only, node, node.current.public, **IDS) == text
    with pytest.raises(RunLogError) as refused:
        open_log(own_only, initiator, node.current.public, **IDS)
    assert refused.value.kind == "not-a-recipient"

    shared = seal_log(text, node.current, [node.current.public, initiator.current.public], **IDS)
    assert open_log(shared, initiator, node.current.public, **IDS) == text
    with pytest.raises(RunLogError) as elsewhere:  # a server cannot pass it off as another run's log
        open_log(shared, node, node.current.public, **{**IDS, "run_id": 12})
    assert elsewhere.value.kind == "other-run"
    with pytest.raises(RunLogError) as unsigned:  # nor forge one: the sender must be the organization
        open_log(shared, initiator, stranger.current.public, **IDS)
    assert unsigned.value.kind == "unknown-sender"
    with pytest.raises(RunLogError) as garbage:
        open_log("not base64!", node, node.current.public, **IDS)
    assert garbage.value.kind == "not-base64"
