"""Bulk signature checks (vfed.common.ledger.fast.preverify) in every mode: the same marks as checking one by
one, a bad signature among many still caught by `apply` with its entry named, and no key used that no record
names. Small ledgers only; the timings are bench/ledger.py's."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vfed.common.crypto import OrgKey
from vfed.common.ledger import (
    DatasetUse,
    Head,
    LedgerEntryInvalid,
    LedgerState,
    LedgerTampered,
    NoValidLease,
    Record,
    checkpoint_entry,
    dataset_entry,
    extend_entry,
    fast,
    lease_entry,
    link,
    receipt_entry,
    revoke_entry,
)
from vfed.common.ledger.chain import entry_json
from vfed.common.trust import SignedEntry, certify, genesis_record, rotation_record
from vfed.common.trust.entries import Signature

COLLAB = 5
IMAGE = "sha256:" + "ab" * 32
MODES = ("inline", "threads", "processes")


class Ledger:
    """Two organizations; organization 1 rotates its key, certifies an org admin, registers a dataset, leases
    it to organization 2 and reports runs; both checkpoint."""

    def __init__(self, receipts: int) -> None:
        self.a, self.a2, self.b, self.admin = (OrgKey.generate() for _ in range(4))
        self.entries: list[SignedEntry] = []
        self.hashes = ["0" * 64]
        now = int(time.time())
        self.add(genesis_record(1, self.a))
        self.add(genesis_record(2, self.b))
        self.add(rotation_record(1, self.a, self.a2))
        cert = self.add(certify(self.a2, 1, 10, "ada", self.admin.public, roles=["org-admin"]))
        data = self.add(
            dataset_entry(self.a2, collaboration=COLLAB, organization=1, label="patients", seen=self.head())
        )
        lease = self.add(
            lease_entry(
                self.admin,
                collaboration=COLLAB,
                dataset=data.digest,
                owner=1,
                grantee=2,
                expires_at=now + 3600,
                by_user=10,
                certificate=cert.digest,
                seen=self.head(),
            )
        )
        for n in range(receipts):
            if n % 50 == 25:
                self.add(checkpoint_entry(self.b, collaboration=COLLAB, organization=2, seen=self.head()))
            if n % 100 == 50:
                self.add(
                    extend_entry(
                        self.admin,
                        collaboration=COLLAB,
                        lease=lease.digest,
                        expires_at=now + 7200 + n,
                        by_user=10,
                        certificate=cert.digest,
                        seen=self.head(),
                    )
                )
            self.add(
                receipt_entry(
                    self.a2,
                    collaboration=COLLAB,
                    organization=1,
                    task=n,
                    run=n,
                    image=IMAGE,
                    finished_at=now,
                    status="completed",
                    seen=self.head(),
                    datasets=[DatasetUse(label="patients", dataset=data.digest, lease=lease.digest)],
                )
            )
        self.pins = {1: self.a.key_id, 2: self.b.key_id}

    def head(self) -> Head:
        return Head(seq=len(self.entries), hash=self.hashes[-1])

    def add(self, entry: SignedEntry) -> SignedEntry:
        self.entries.append(entry)
        self.hashes.append(link(COLLAB, len(self.entries), self.hashes[-1], entry.to_json()))
        return entry

    def records(self) -> list[Record]:
        """As a verifier gets them: parsed again from the wire."""
        return [
            Record.from_wire({"seq": n, "hash": self.hashes[n], "entry": e.model_dump(mode="json")})
            for n, e in enumerate(self.entries, start=1)
        ]

    def state(self) -> LedgerState:
        return LedgerState(COLLAB, anchors=self.pins.get)


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger(receipts=400)


@pytest.fixture(autouse=True)
def _stop_workers() -> Iterator[None]:
    yield
    fast.shutdown()


def marks(state: LedgerState) -> dict[int, frozenset[str]]:
    """What preverify told the state (entries with a signature that held), waiting for checks under way."""
    out = {}
    for seq, done in state._preverified.items():
        keys = done() if callable(done) else done
        if keys:
            out[seq] = keys
    return out


def one_by_one(state: LedgerState, records: list[Record]) -> dict[int, frozenset[str]]:
    """The sequential reference: every signature checked with every key the batch or the state names."""
    keys = fast.verified_keys(state)
    keys.update(fast.known_keys(records))
    out = {}
    for record in records:
        good = frozenset(
            s.key_id for s in record.entry.sigs if s.key_id in keys and record.entry.signed_by(keys[s.key_id])
        )
        if good:
            out[record.seq] = good
    return out


def summary(state: LedgerState) -> tuple[object, ...]:
    return (
        state.head,
        sorted((x.id, x.runs, x.expires_at) for x in state.leases.values()),
        [r.digest for r in state.receipts],
        len(state.checkpoints),
        [p.message for p in state.problems],
    )


@pytest.mark.parametrize("mode", MODES)
def test_marks_equal_the_sequential_checks_and_the_state_is_the_same(ledger: Ledger, mode: fast.Mode) -> None:
    records = ledger.records()
    reference = ledger.state()
    reference.apply_all(records)

    state = ledger.state()
    for at in range(0, len(records), 150):  # pages, as LedgerView.verify_full reads them
        page = records[at : at + 150]
        expected = one_by_one(state, page)
        fast.preverify(state, page, mode=mode)
        assert marks(state) == expected
        assert expected  # every page has something to check
        state.apply_all(page)
        assert not state._preverified  # each applied entry's marks are gone with it
    assert summary(state) == summary(reference)


def test_later_pages_use_keys_the_state_verified(ledger: Ledger) -> None:
    """The admin's certificate and the rotated key were on the first page; a later page's leases and receipts
    are still checked in bulk."""
    records = ledger.records()
    state = ledger.state()
    state.apply_all(records[:10])
    fast.preverify(state, records[10:], mode="processes")
    got = marks(state)
    assert set(got) == {r.seq for r in records[10:]}
    extension = next(r for r in records[10:] if r.entry.kind == "lease.extended")
    assert got[extension.seq] == frozenset({ledger.admin.key_id})
    state.apply_all(records[10:])


@pytest.mark.parametrize("mode", MODES)
def test_a_bad_signature_among_many_is_caught_by_apply_naming_it(ledger: Ledger, mode: fast.Mode) -> None:
    records = ledger.records()
    bad_at = 301
    victim = records[bad_at - 1].entry
    assert victim.kind == "run.receipt"
    wrong = ledger.a2.sign(b"something else")  # the right key, another message
    forged = SignedEntry(
        kind=victim.kind,
        body=victim.body,
        sigs=[Signature(key_id=ledger.a2.key_id, sig=base64.b64encode(wrong).decode())],
    )
    # The server chains what it is given: the chain itself is intact.
    tampered = Ledger.__new__(Ledger)
    tampered.entries, tampered.hashes, tampered.pins = [], ["0" * 64], ledger.pins
    for record in records:
        tampered.add(forged if record.seq == bad_at else record.entry)
    records = tampered.records()

    state = tampered.state()
    fast.preverify(state, records, mode=mode)
    got = marks(state)
    assert bad_at not in got
    assert got.keys() == {r.seq for r in records} - {bad_at}
    with pytest.raises(LedgerEntryInvalid, match=rf"ledger entry {bad_at} \(run\.receipt .*forged"):
        state.apply_all(records)
    assert state.length == bad_at - 1


@pytest.mark.parametrize("mode", MODES)
def test_keys_no_record_names_are_not_used(ledger: Ledger, mode: fast.Mode) -> None:
    records = ledger.records()
    stranger = OrgKey.generate()
    entry = receipt_entry(
        stranger,
        collaboration=COLLAB,
        organization=1,
        task=1,
        run=1,
        image=IMAGE,
        finished_at=1,
        status="completed",
        seen=ledger.head(),
    )
    extra = Record(len(records) + 1, entry)
    state = ledger.state()
    fast.preverify(state, [*records, extra], mode=mode)
    assert extra.seq not in marks(state)

    # Without the records that name them (key records, the admin's certificate), nothing is checked in bulk.
    state = ledger.state()
    later = [r for r in records if r.entry.kind not in fast.KEY_BEARING]
    fast.preverify(state, later, mode=mode)
    assert marks(state) == {}


def test_a_worker_that_fails_costs_only_time(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    fast.shutdown()
    monkeypatch.setattr(fast, "_WORKER_CODE", "import sys; sys.stdin.buffer.read(8); sys.exit(3)")
    records = ledger.records()
    state = ledger.state()
    fast.preverify(state, records, mode="processes")
    assert marks(state) == one_by_one(ledger.state(), records)
    state.apply_all(records)


def test_workers_start_on_demand_and_stop() -> None:
    ledger = Ledger(receipts=fast.MIN_PARALLEL)
    records = ledger.records()
    fast.shutdown()
    assert fast._POOL.workers == []
    fast.preverify(ledger.state(), records)  # large enough for the automatic choice to use them
    workers = list(fast._POOL.workers)
    assert len(workers) == fast.cpus() or fast.cpus() < 2
    fast.shutdown()
    assert fast._POOL.workers == []
    assert all(w.proc.returncode is not None for w in workers)


def test_the_mode_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast.default_mode(10) == "inline"
    monkeypatch.setenv(fast.MODE_ENV, "threads")
    assert fast.default_mode(10) == "threads"
    monkeypatch.setenv(fast.MODE_ENV, "gpu")
    with pytest.raises(ValueError, match="VFED_LEDGER_VERIFY"):
        fast.default_mode(10)


@pytest.mark.parametrize(
    "body",
    [
        {"a": {1: "int keys"}},
        {"a": (1, 2)},
        {"a": 'é\u2028"\\', "b": 1.5, "c": [True, None, {"d": -0.0}], "e": 10**30},
        {"t": float("1e16")},
    ],
)
def test_the_entry_json_made_from_the_message_is_to_json(ledger: Ledger, body: dict[str, object]) -> None:
    weird = SignedEntry(kind="kind.é", body=body, sigs=ledger.entries[0].sigs)
    for entry in [*(r.entry for r in ledger.records()[:50]), weird]:
        assert entry_json(entry, entry.message()) == entry.to_json().encode("utf-8")


def test_the_lease_check_answers_as_a_scan_of_every_lease_does() -> None:
    """`leases_for` reads an index and writes reasons only when needed: the same answer as the plain scan."""
    a, b, c, admin = (OrgKey.generate() for _ in range(4))
    now = int(time.time())
    led = Ledger.__new__(Ledger)
    led.entries, led.hashes, led.pins = [], ["0" * 64], {1: a.key_id, 2: b.key_id, 3: c.key_id}
    for org, key in ((1, a), (2, b), (3, c)):
        led.add(genesis_record(org, key))
    cert = led.add(certify(a, 1, 10, "ada", admin.public, roles=["org-admin"], now=now - 7200))
    data = {
        label: led.add(
            dataset_entry(a, collaboration=COLLAB, organization=1, label=label, seen=led.head(), now=now)
        )
        for label in ("x", "y")
    }
    leases = []
    for n in range(60):
        lease = lease_entry(
            admin, collaboration=COLLAB, dataset=data["xy"[n % 2]].digest, owner=1, grantee=2 + n % 3 // 2,
            expires_at=now + 3600 if n % 7 == 0 else now + (n % 5 - 1) * 600 + 1,
            not_before=now + 1800 if n % 7 == 0 else now - 7200,
            users=[7] if n % 4 == 0 else None, images=[IMAGE] if n % 3 == 0 else None, by_user=10,
            certificate=cert.digest, seen=led.head(), now=now - 7200,
        )  # fmt: skip
        leases.append(led.add(lease))
        if n % 11 == 5:
            led.add(
                revoke_entry(
                    admin,
                    collaboration=COLLAB,
                    lease=lease.digest,
                    reason="r",
                    by_user=10,
                    certificate=cert.digest,
                    seen=led.head(),
                    now=now - 7200,
                )
            )
    state = led.state()
    state.apply_all(led.records())
    assert len(state.leases) == 60

    def scan(**query: Any) -> list[str] | str:
        good, reasons = [], []
        for lease in state.leases_on(query["owner"], query["label"]):
            why = lease.refusal(
                grantee=query["grantee"], user=query["user"], images=query["images"], now=query["now"]
            )
            if why is None:
                good.append(lease.id)
            elif lease.grantee == query["grantee"]:
                reasons.append(why)
        if good:
            return good
        return "; ".join(reasons) or "none"

    answers = set()
    for label in ("x", "y", "z"):
        for grantee in (2, 3, 4):
            for user in (None, 7, 8):
                for images in ([IMAGE], [], ["sha256:" + "cd" * 32]):
                    for at in (now - 8000, now, now + 700, now + 5000):
                        query = dict(owner=1, label=label, grantee=grantee, user=user, images=images, now=at)
                        try:
                            got: list[str] | str = [x.id for x in state.leases_for(**query)]  # type: ignore[arg-type]
                        except NoValidLease as exc:
                            got = exc.message
                        want = scan(**query)
                        if isinstance(want, list):
                            assert got == want
                        else:
                            assert isinstance(got, str)
                            assert (want == "none" and "has no lease" in got) or got.endswith(want)
                        answers.add(isinstance(got, list))
    assert answers == {True, False}


@pytest.mark.parametrize(
    "body",
    [
        {"a": {1: "int keys"}},
        {"a": (1, 2)},
        {"a": 'é\u2028"\\', "b": 1.5, "c": [True, None, {"d": -0.0}], "e": 10**30},
        {"t": float("1e16")},
        {"bad": "\udc80"},
        {"nan": float("nan")},
    ],
)
def test_what_a_worker_makes_is_what_the_state_makes(ledger: Ledger, body: dict[str, object]) -> None:
    """A worker's digest and entry hash (through marshal, as a job travels) are the entry's own, or none."""
    import hashlib
    import marshal

    from vfed.common.ledger import fastwork

    weird = SignedEntry(kind="kind.é", body=body, sigs=ledger.entries[0].sigs)
    for entry in [*(r.entry for r in ledger.records()[:50]), weird]:
        records = [Record(1, entry)]
        jobs: list[fast._Job] = []
        fast._walk(ledger.state(), records, (), fast._Batch(ledger.state(), jobs.append))
        (job,) = jobs
        (result,) = marshal.loads(marshal.dumps(fastwork.work(marshal.loads(job.payload()))))
        try:
            text = entry.to_json().encode("utf-8")
            digest = entry.digest
        except Exception:
            assert result is None
            continue
        assert result is not None and result[0] == digest
        assert result[1] in (None, hashlib.sha256(text).digest())
        assert result[1] is not None or entry is weird


@pytest.mark.parametrize("mode", MODES)
def test_two_entries_served_at_one_place_share_no_checks(ledger: Ledger, mode: fast.Mode) -> None:
    """A server serving a forged entry and a valid one at the same place: the valid one's checks do not make
    the forged one pass, in either order."""
    records = ledger.records()
    at = next(r.seq for r in records[299:] if r.entry.kind == "run.receipt")
    victim = records[at - 1].entry
    forged = SignedEntry(
        kind=victim.kind,
        body={**victim.body, "task": 999_999},
        sigs=victim.sigs,  # the signature of the other content, by the right key
    )
    for pair in ([Record(at, forged), records[at - 1]], [records[at - 1], Record(at, forged)]):
        state = ledger.state()
        state.apply_all(records[: at - 1])
        fast.preverify(state, [*pair, *records[at:]], mode=mode)
        if pair[0].entry is forged:
            with pytest.raises(LedgerEntryInvalid, match=rf"ledger entry {at} .*forged"):
                state.apply(pair[0])
            assert state.length == at - 1
        state.apply(records[at - 1])
        assert state.length == at


@pytest.mark.parametrize("mode", MODES)
def test_checks_of_a_page_that_failed_hold_for_nothing_read_later(ledger: Ledger, mode: fast.Mode) -> None:
    """A page fails halfway (an entry's stored hash does not match); the checks made for the rest of it do
    not vouch for other entries the server serves at those places afterwards."""
    records = ledger.records()
    at = next(r.seq for r in records[150:] if r.entry.kind == "run.receipt")  # entry `at + 1` is forged
    state = ledger.state()
    state.apply_all(records[:100])
    page = list(records[100:300])
    page[at - 101] = Record(at, records[at - 1].entry, "f" * 64)  # a stored hash that does not match
    fast.preverify(state, page, mode=mode)
    state.apply_all(page[: at - 101])
    with pytest.raises(LedgerTampered):
        state.apply(page[at - 101])
    # Later, without bulk checks: the honest entry, then one forged with the next entry's signature.
    state.apply(records[at - 1])
    victim = records[at].entry
    assert victim.kind == "run.receipt"
    forged = SignedEntry(kind=victim.kind, body={**victim.body, "task": 999_999}, sigs=victim.sigs)
    with pytest.raises(LedgerEntryInvalid, match="forged"):
        state.apply(Record(at + 1, forged))
    state.apply_all(records[at:])
    assert state.length == len(records)


class _Pages:
    """A backend serving the ledger's records in pages of `limit`, one page broken if asked."""

    def __init__(self, records: list[Record], broken_after: int | None = None) -> None:
        self.records, self.broken_after, self.collaboration_id = records, broken_after, COLLAB

    async def append(self, entry: SignedEntry) -> Head:
        raise NotImplementedError

    async def read(self, after: int, limit: int = 1000) -> list[Record]:
        if self.broken_after is not None and after >= self.broken_after:
            raise LedgerTampered(f"ledger entry {after + 1} is malformed: broken")
        return self.records[after : after + limit]


@pytest.mark.parametrize("bad", [None, 120])
async def test_a_full_verification_reads_ahead_and_still_names_the_first_bad_entry(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, bad: int | None
) -> None:
    """verify_full reads the next page before it applies the last: the same report, and an entry that does
    not verify is named before a page that cannot be read after it."""
    from vfed.common.ledger import LedgerView
    from vfed.common.ledger import view as view_module

    monkeypatch.setattr(view_module, "READ_LIMIT", 100)
    records = ledger.records()
    if bad is not None:
        records[bad - 1] = Record(bad, records[bad - 1].entry, "f" * 64)
    reference = ledger.state()
    with contextlib.suppress(LedgerTampered):
        reference.apply_all(records)
    view = LedgerView(_Pages(records), ledger.state)  # type: ignore[arg-type]
    if bad is None:
        report = await view.verify_full()
        assert (report.length, report.head) == (len(records), reference.head)
    else:
        with pytest.raises(LedgerTampered, match=f"ledger entry {bad} "):
            await view.verify_full()
        view = LedgerView(_Pages(records, broken_after=200), ledger.state)  # type: ignore[arg-type]
        with pytest.raises(LedgerTampered, match=f"ledger entry {bad} "):
            await view.verify_full()


def test_the_workers_canonical_json_is_the_signed_entries() -> None:
    """Workers make each entry's signed message themselves (fastwork.CANONICAL): the same encoder settings
    as vfed.common.trust.entries, so the same bytes."""
    from vfed.common.ledger import fastwork
    from vfed.common.trust import entries

    ours, theirs = fastwork.CANONICAL, entries._CANONICAL
    for option in ("sort_keys", "item_separator", "key_separator", "ensure_ascii", "allow_nan", "indent"):
        assert getattr(ours, option) == getattr(theirs, option), option
    assert fastwork.SIGN_DOMAIN == entries.SIGN_DOMAIN


class _Text(str):
    __slots__ = ()


@pytest.mark.parametrize("mode", MODES)
def test_bodies_a_worker_cannot_take_are_verified_here_the_same(ledger: Ledger, mode: fast.Mode) -> None:
    """Bodies marshal cannot carry exactly (a str subclass), that are not what JSON decodes to (int keys, a
    tuple) or that nest deeper than a worker walks: the state makes those itself, with the same outcome as
    without bulk checks."""
    deep: object = "leaf"
    for _ in range(5000):
        deep = [deep]
    assert fastwork_native(deep) is False  # too deep to walk: not known to be native, no exception
    bodies = [
        {"note": _Text("a str subclass"), "n": 1},
        {"keys": {2: "b", 10: "a"}},
        {"pair": (1, 2)},
        {"deep": deep},
    ]
    base = ledger.entries[:4]  # the two geneses, organization 1's rotation and its admin's certificate
    for n, body in enumerate(bodies):
        hashes = ["0" * 64]
        records = []
        for seq, entry in enumerate([*base, sign_odd(ledger.a2, f"test.odd{n}", body)], start=1):
            try:
                text: str | None = entry.to_json()
            except Exception:
                text = None
            hashes.append(link(COLLAB, seq, hashes[-1], text) if text is not None else "f" * 64)
            records.append(Record(seq, entry, hashes[-1]))

        def outcome(state: LedgerState, records: list[Record] = records) -> tuple[object, ...]:
            for record in records:
                try:
                    state.apply(record)
                except Exception as exc:  # named in order
                    return state.length, type(exc).__name__, str(exc)
            return state.length, state.head

        reference = outcome(ledger.state())
        state = ledger.state()
        fast.preverify(state, records, mode=mode)
        assert outcome(state) == reference, body
        assert reference[0] == len(base)
        if body is not bodies[-1]:  # its chain hash held; refused as of no ledger kind, named
            assert f"ledger entry 5 (test.odd{n} " in str(reference[2])
            assert "unknown kind" in str(reference[2])


def fastwork_native(value: object) -> bool:
    from vfed.common.ledger import fastwork

    return fastwork.json_native(value)


def sign_odd(key: OrgKey, kind: str, body: dict[str, object]) -> SignedEntry:
    """An entry over a body as given (not round-tripped through JSON, as `sign_entry` does)."""
    from vfed.common.trust.entries import signing_message

    try:
        message = signing_message(kind, body)
    except Exception:
        message = b"no canonical form"
    sig = Signature(key_id=key.key_id, sig=base64.b64encode(key.sign(message)).decode())
    return SignedEntry(kind=kind, body=body, sigs=[sig])


def test_worker_processes_run_at_a_lower_priority() -> None:
    """One worker per CPU beside the verifying process: they yield to its sequential pass (fastwork.NICE)."""
    import os

    from vfed.common.ledger import fastwork

    if fast.cpus() < 2:
        pytest.skip("one CPU: no worker processes")
    fast.shutdown()
    workers = fast._POOL.get()
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        deadline = time.monotonic() + 10
        seen: list[int] = []
        while time.monotonic() < deadline:  # the worker renices itself as it starts
            seen = [os.getpriority(os.PRIO_PROCESS, w.proc.pid) for w in workers]
            if all(n == min(own + fastwork.NICE, 19) for n in seen):
                break
            time.sleep(0.05)
        assert seen == [min(own + fastwork.NICE, 19)] * len(workers)
    finally:
        fast.shutdown()


def test_a_page_of_records_parsed_at_once_is_parsed_as_one_by_one(ledger: Ledger) -> None:
    """`Record.page_from_wire` (one validation for a page) gives what `from_wire` gives for each; for a page
    with anything wrong it gives None, and the embedded backend then names the entry as before."""
    import asyncio

    from vfed.common.ledger import EmbeddedLedger

    wire = [
        {"seq": n, "hash": ledger.hashes[n], "entry": e.model_dump(mode="json")}
        for n, e in enumerate(ledger.entries[:60], start=1)
    ]
    page = Record.page_from_wire(wire)
    assert page is not None
    assert page == [Record.from_wire(item) for item in wire]
    bad_entry = {**wire[7], "entry": {**wire[7]["entry"], "sigs": [{"key_id": "x", "sig": "y"}]}}
    for broken in (
        [*wire[:7], bad_entry],
        [*wire[:7], {**wire[7], "seq": True}],
        [*wire[:7], {**wire[7], "entry": {**wire[7]["entry"], "v": 2}}],
        [*wire[:7], "not a record"],
    ):
        assert Record.page_from_wire(broken) is None

    class Served:
        def __init__(self, items: list[object]) -> None:
            self.items = items

        async def get_json(self, path: str, params: dict[str, str]) -> object:
            return {"entries": self.items}

        async def post_json(self, path: str, body: object) -> object:
            raise NotImplementedError

    assert asyncio.run(EmbeddedLedger(Served(wire), COLLAB).read(0)) == page
    with pytest.raises(LedgerTampered, match="ledger entry 8 is malformed"):
        asyncio.run(EmbeddedLedger(Served([*wire[:7], bad_entry]), COLLAB).read(0))
