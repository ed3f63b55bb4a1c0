"""Ledger benchmark (issue 14): the in-memory lease check, a full verification and an incremental one.

A realistic ledger is built in memory: three organizations (key genesis records, an org admin's
certificate), datasets, many leases (some extended or revoked), and mostly run receipts and checkpoints, each
signed with the right key and carrying the head its signer had seen. It is cached in /tmp by its parameters
(signing 100,000 entries takes a while). Then, in one run:
- `ed25519_verify_per_s`: libsodium's raw single-core Ed25519 verify rate here (the limit);
- `full_verify_100k_s`: `LedgerView.verify_full` over a backend serving the records as wire JSON pages, as
  the embedded backend parses them (parse + `fast.preverify` + `LedgerState.apply`); scaled to 100,000
  entries when `--entries` differs; `entries_verify_per_s` is its rate;
- `incremental_verify_100_ms`: 100 new records parsed from wire JSON and applied (signatures checked), as
  `LedgerView.sync` does, on a state holding the rest; median of several batches;
- `lease_check_p50_ms`, `lease_check_p99_ms`: `LedgerState.leases_for`, the lease check a node makes per run.
Run: `flock -x /tmp/vfed-cpu.lock .venv/bin/python bench/ledger.py [--json] [--entries N] [--quick]`;
`--backend fabric` compares the backends instead (bench/ledger_backends.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import gzip
import hashlib
import json
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfed.common.crypto import OrgKey
from vfed.common.ledger import (
    EMPTY_HEAD,
    DatasetUse,
    EmbeddedLedger,
    Head,
    LedgerState,
    LedgerView,
    Record,
    checkpoint_entry,
    dataset_entry,
    extend_entry,
    lease_entry,
    link,
    receipt_entry,
    revoke_entry,
)
from vfed.common.ledger.backend import READ_LIMIT
from vfed.common.trust import certify, genesis_record
from vfed.common.trust.entries import SignedEntry

COLLAB = 1
ORGS = (1, 2, 3)
DATASETS_PER_ORG = 4
LEASE_SHARE = 0.02  # of the entries: leases granted (a few of them extended or revoked)
CHECKPOINT_SHARE = 0.04
START = 1_700_000_000
IMAGE = "sha256:" + "ab" * 32
OTHER_IMAGE = "sha256:" + "cd" * 32
FORMAT = 3  # of the cached ledger file: bump when the generator changes

TARGET_FULL_S = 10.0
TARGET_INCREMENTAL_MS = 20.0
TARGET_LEASE_CHECK_MS = 1.0


# -- the ledger --------------------------------------------------------------------------------------------
@dataclass
class Built:
    lines: list[str]
    """Records as the server serves them, {"seq", "hash", "entry"}, each as JSON text: kept as text, the
    benchmark's own copy of the ledger adds nothing to what the garbage collector walks."""
    anchors: dict[int, str]
    """Organization -> its first key's id (the pins)."""


class _Writer:
    """Appends signed entries and keeps the chain, as the server would."""

    def __init__(self) -> None:
        self.wire: list[dict[str, Any]] = []
        self.hashes = [EMPTY_HEAD.hash]

    @property
    def head(self) -> Head:
        return Head(seq=len(self.wire), hash=self.hashes[-1]) if self.wire else EMPTY_HEAD

    def seen(self, rng: random.Random) -> Head:
        """A head a signer verified a little while ago (up to 50 entries behind)."""
        seq = max(0, len(self.wire) - rng.randrange(0, 50))
        return Head(seq=seq, hash=self.hashes[seq])

    def add(self, entry: SignedEntry) -> None:
        seq = len(self.wire) + 1
        text = entry.to_json()
        digest = link(COLLAB, seq, self.hashes[-1], text)
        self.hashes.append(digest)
        self.wire.append({"seq": seq, "hash": digest, "entry": json.loads(text)})


def build(entries: int, seed: int = 14) -> Built:
    rng = random.Random(seed)
    w = _Writer()
    now = START
    org_keys = {org: OrgKey.generate(created_s=now) for org in ORGS}
    admin_keys = {org: OrgKey.generate(created_s=now) for org in ORGS}
    certs: dict[int, str] = {}
    for org in ORGS:
        w.add(genesis_record(org, org_keys[org], created_at=now))
    for org in ORGS:
        cert = certify(
            org_keys[org],
            org,
            100 + org,
            f"admin{org}",
            admin_keys[org].public,
            roles=("org-admin",),
            validity_s=10 * 365 * 86400,
            now=now,
        )
        certs[org] = cert.digest
        w.add(cert)
    datasets: dict[int, list[tuple[str, str]]] = {}
    for org in ORGS:
        for i in range(DATASETS_PER_ORG):
            label = f"data{i}"
            entry = dataset_entry(
                org_keys[org],
                collaboration=COLLAB,
                organization=org,
                label=label,
                seen=w.head,
                description=f"dataset {i} of organization {org}",
                content_hash=hashlib.sha256(label.encode()).hexdigest(),
                now=now,
            )
            w.add(entry)
            datasets.setdefault(org, []).append((label, entry.digest))
    leases: dict[int, list[tuple[str, str, int]]] = {org: [] for org in ORGS}  # owner -> (id, label, grantee)
    while len(w.wire) < entries:
        now += rng.randrange(1, 30)
        roll = rng.random()
        owner = rng.choice(ORGS)
        if roll < LEASE_SHARE or not leases[owner]:
            label, dataset = rng.choice(datasets[owner])
            grantee = rng.choice([o for o in ORGS if o != owner])
            lease = lease_entry(
                admin_keys[owner],
                collaboration=COLLAB,
                dataset=dataset,
                owner=owner,
                grantee=grantee,
                expires_at=now + rng.choice((1, 7, 30, 365)) * 86400,
                by_user=100 + owner,
                certificate=certs[owner],
                seen=w.seen(rng),
                users=[rng.randrange(1000, 1010)],
                purpose="benchmark",
                images=[IMAGE] if rng.random() < 0.5 else None,
                epsilon=10.0 if rng.random() < 0.3 else None,
                max_runs=None,
                now=now,
            )
            w.add(lease)
            leases[owner].append((lease.digest, label, grantee))
        elif roll < LEASE_SHARE * 1.15:
            lease_id = rng.choice(leases[owner])[0]
            if rng.random() < 0.6:
                w.add(
                    extend_entry(
                        admin_keys[owner],
                        collaboration=COLLAB,
                        lease=lease_id,
                        expires_at=now + 60 * 86400,
                        by_user=100 + owner,
                        certificate=certs[owner],
                        seen=w.seen(rng),
                        now=now,
                    )
                )
            else:
                leases[owner] = [x for x in leases[owner] if x[0] != lease_id]  # no runs on it from now
                w.add(
                    revoke_entry(
                        admin_keys[owner],
                        collaboration=COLLAB,
                        lease=lease_id,
                        reason="benchmark",
                        by_user=100 + owner,
                        certificate=certs[owner],
                        seen=w.seen(rng),
                        now=now,
                    )
                )
        elif roll < LEASE_SHARE * 1.15 + CHECKPOINT_SHARE:
            w.add(
                checkpoint_entry(
                    org_keys[owner], collaboration=COLLAB, organization=owner, seen=w.seen(rng), now=now
                )
            )
        else:
            lease_id, label, _ = rng.choice(leases[owner][-200:])
            dataset = dict(datasets[owner])[label]
            n = len(w.wire)
            w.add(
                receipt_entry(
                    org_keys[owner],
                    collaboration=COLLAB,
                    organization=owner,
                    task=n,
                    run=n * 3,
                    image=IMAGE,
                    finished_at=now,
                    status="completed",
                    seen=w.seen(rng),
                    datasets=[DatasetUse(label=label, dataset=dataset, lease=lease_id, epsilon=0.01)],
                    descriptor=hashlib.sha256(b"d%d" % n).hexdigest(),
                    input_hash=hashlib.sha256(b"i%d" % n).hexdigest(),
                    result_hash=hashlib.sha256(b"r%d" % n).hexdigest(),
                    started_at=now - 5,
                    now=now,
                )
            )
    return Built([json.dumps(x) for x in w.wire], {org: org_keys[org].key_id for org in ORGS})


def cached(entries: int) -> Built:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vfed-bench-ledger-v{FORMAT}-{entries}.json.gz"
    if path.exists():
        try:
            data = json.loads(gzip.decompress(path.read_bytes()))
            built = Built(
                [json.dumps(x) for x in data["wire"]], {int(k): v for k, v in data["anchors"].items()}
            )
            del data
            gc.collect()
            return built
        except (OSError, ValueError, KeyError):
            pass
    start = time.perf_counter()
    built = build(entries)
    print(
        f"  (built {entries} signed entries in {time.perf_counter() - start:.1f} s; cached in {path})",
        file=sys.stderr,
    )
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    text = '{"anchors":' + json.dumps(built.anchors) + ',"wire":[' + ",".join(built.lines) + "]}"
    tmp.write_bytes(gzip.compress(text.encode(), 1))
    tmp.replace(path)
    return built


# -- measurements ------------------------------------------------------------------------------------------
def page(lines: list[str]) -> str:
    """The server's answer to a read, as JSON text."""
    return '{"entries":[' + ",".join(lines) + "]}"


class _Transport:
    """The server's answers as JSON text, decoded per request as an HTTP client would."""

    def __init__(self, lines: list[str]) -> None:
        self.pages = {
            after: page(lines[after : after + READ_LIMIT]) for after in range(0, len(lines) + 1, READ_LIMIT)
        }

    async def get_json(self, path: str, params: dict[str, str]) -> Any:
        after, limit = int(params["after"]), int(params["limit"])
        assert limit == READ_LIMIT and after in self.pages, (after, limit)
        return json.loads(self.pages[after])

    async def post_json(self, path: str, body: Any) -> Any:
        raise NotImplementedError


def new_state(built: Built) -> LedgerState:
    return LedgerState(COLLAB, anchors=built.anchors.get)


def signatures(built: Built) -> list[tuple[bytes, bytes]]:
    """(signature + message, Ed25519 key) of the ledger's last 2000 entries, as libsodium takes them."""
    from vfed.common.crypto import PublicKey

    keys = {}
    for line in built.lines[:20]:
        entry = SignedEntry.parse(json.loads(line)["entry"])
        if isinstance(entry.body.get("key"), str):
            key = PublicKey.from_text(entry.body["key"])
            keys[key.key_id] = key.ed25519
    out = []
    for line in built.lines[-2000:]:
        entry = SignedEntry.parse(json.loads(line)["entry"])
        sig = entry.sigs[0]
        if sig.key_id in keys:
            out.append((sig.raw() + entry.message(), keys[sig.key_id]))
    return out


def ed25519_rate(samples: list[tuple[bytes, bytes]], seconds: float) -> float:
    """libsodium's verify rate on one thread (what the workers call)."""
    from nacl.bindings import crypto_sign_open

    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for signed, key in samples:
            crypto_sign_open(signed, key)
        done += len(samples)
    return done / elapsed


def ed25519_threads_rate(samples: list[tuple[bytes, bytes]], threads: int, seconds: float) -> float:
    """The same on `threads` threads at once (libsodium releases the GIL): the total rate."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda _: ed25519_rate(samples, seconds), range(threads)))


@dataclass
class Timed:
    wall_s: float
    cpu_s: float
    """This process (all its threads)."""
    workers_cpu_s: float
    """fast.preverify's worker processes (reaped after the run, so they count)."""


def full_verify(built: Built, mode: str | None) -> Timed:
    """`LedgerView.verify_full` from wire JSON; `mode` forces fast.preverify's mode."""
    from vfed.common.ledger import fast

    backend = EmbeddedLedger(_Transport(built.lines), COLLAB)
    view = LedgerView(backend, lambda: new_state(built))
    saved = os.environ.get(fast.MODE_ENV)
    if mode is not None:
        os.environ[fast.MODE_ENV] = mode
    fast.shutdown()  # the workers' start counts
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        start = time.perf_counter()
        report = asyncio.run(view.verify_full())
        elapsed = time.perf_counter() - start
    finally:
        if saved is None:
            os.environ.pop(fast.MODE_ENV, None)
        else:
            os.environ[fast.MODE_ENV] = saved
    fast.shutdown()
    own2, children2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    assert report.length == len(built.lines) and not report.problems, report
    return Timed(
        elapsed,
        own2.ru_utime + own2.ru_stime - own.ru_utime - own.ru_stime,
        children2.ru_utime + children2.ru_stime - children.ru_utime - children.ru_stime,
    )


def incremental(built: Built, batch: int, batches: int) -> tuple[list[float], LedgerState]:
    """Seconds per batch of `batch` new records (wire JSON parsed, then applied with signature checks) on a
    state that holds everything before them; the state at the end holds the whole ledger."""
    from vfed.common.ledger.fast import preverify

    state = new_state(built)
    cut = len(built.lines) - batch * batches
    for at in range(0, cut, READ_LIMIT):
        prefix = [Record.from_wire(json.loads(line)) for line in built.lines[at : min(at + READ_LIMIT, cut)]]
        preverify(state, prefix)
        state.apply_all(prefix)
    pages = [page(built.lines[at : at + batch]) for at in range(cut, len(built.lines), batch)]
    times = []
    for text in pages:
        start = time.perf_counter()
        records = [Record.from_wire(item) for item in json.loads(text)["entries"]]
        for record in records:
            state.apply(record)
        times.append(time.perf_counter() - start)
    assert state.length == len(built.lines) and not state.problems
    return times, state


def lease_checks(state: LedgerState, calls: int) -> list[float]:
    """Seconds per `leases_for` call, for runs like a node's: the lease's own grantee, user and image."""
    from vfed.common.ledger import NoValidLease

    rng = random.Random(5)
    leases = list(state.leases.values())
    now = max(x.body.at for x in leases)
    times = []
    for _ in range(calls):
        lease = rng.choice(leases)
        user = lease.body.users[0] if lease.body.users else None
        start = time.perf_counter()
        with contextlib.suppress(NoValidLease):
            state.leases_for(
                owner=lease.owner,
                label=lease.dataset.label,
                grantee=lease.grantee,
                user=user,
                images=[IMAGE],
                now=now,
            )
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--entries", type=int, default=100_000, help="ledger length (default 100000)")
    parser.add_argument("--quick", action="store_true", help="a small run (5000 entries, fewer repeats)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also verify in fast.preverify's other modes (inline, threads) on up to 20000 entries",
    )
    parser.add_argument(
        "--backend",
        choices=["embedded", "fabric"],
        default="embedded",
        help="fabric: receipts/s on a real Fabric network beside the embedded ledger, and the node's lease "
        "check on a Fabric-held ledger (bench/ledger_backends.py)",
    )
    parser.add_argument("--receipts", type=int, default=40, help="with --backend fabric: receipts appended")
    parser.add_argument("--in-flight", type=int, default=8, help="with --backend fabric: appends at once")
    args = parser.parse_args()
    if args.backend == "fabric":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import ledger_backends

        report = asyncio.run(ledger_backends.run(args.receipts, args.in_flight))
        ledger_backends.print_report(report, args.json)
        return
    entries = 5000 if args.quick and args.entries == 100_000 else args.entries
    built = cached(entries)
    load_before = loadavg()
    samples = signatures(built)
    raw = ed25519_rate(samples, 0.5 if args.quick else 2.0)
    raw2 = ed25519_threads_rate(samples, 2, 0.5 if args.quick else 2.0)
    full = min((full_verify(built, None) for _ in range(1 if args.quick else 2)), key=lambda t: t.wall_s)
    full_s = full.wall_s
    compare: dict[str, float] = {}
    if args.compare:
        part = Built(built.lines[:20_000], built.anchors)
        for mode in ("inline", "threads", "processes"):
            compare[f"entries_verify_per_s.{mode}"] = round(len(part.lines) / full_verify(part, mode).wall_s)
        gc.disable()  # what the garbage collector's walks over the growing state cost
        try:
            nogc = full_verify(built, None)
        finally:
            gc.enable()
        compare["full_verify_100k_nogc_s"] = round(nogc.wall_s * 100_000 / entries, 2)
        compare["full_verify_nogc_cpu_s"] = round(nogc.cpu_s, 2)
    times, state = incremental(built, 100, 5 if args.quick else 11)
    checks = lease_checks(state, 500 if args.quick else 3000)
    report: dict[str, Any] = {
        "entries": entries,
        "leases": len(state.leases),
        "lease_check_p50_ms": round(percentile(checks, 0.5) * 1000, 3),
        "lease_check_p99_ms": round(percentile(checks, 0.99) * 1000, 3),
        "full_verify_100k_s": round(full_s * 100_000 / entries, 2),
        "full_verify_s": round(full_s, 2),
        "full_verify_cpu_s": round(full.cpu_s, 2),
        "full_verify_workers_cpu_s": round(full.workers_cpu_s, 2),
        # On idle CPUs the run takes at least its busiest thread's time and its total CPU time over the CPUs;
        # this process's CPU time is nearly all one thread's (the sequential pass and parsing).
        "full_verify_100k_floor_s": round(
            max(full.cpu_s, (full.cpu_s + full.workers_cpu_s) / (os.cpu_count() or 1)) * 100_000 / entries, 2
        ),
        "incremental_verify_100_ms": round(statistics.median(times) * 1000, 2),
        "incremental_verify_100_max_ms": round(max(times) * 1000, 2),
        "entries_verify_per_s": round(entries / full_s),
        "ed25519_verify_per_s": round(raw),
        "ed25519_verify_2threads_per_s": round(raw2),
        "ratio_entries_vs_ed25519": round(entries / full_s / raw, 3),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        **compare,
    }
    print_report(report, args.json)


def print_report(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r))
        return

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"ledger: {r['entries']} entries ({r['leases']} leases), {r['cpus']} CPUs, "
        f"load average {r['loadavg_before']} before, {r['loadavg_after']} after"
    )
    print(
        f"raw Ed25519 verify (libsodium, one core): {r['ed25519_verify_per_s']}/s; two threads: "
        f"{r['ed25519_verify_2threads_per_s']}/s"
    )
    print(
        f"full verification (wire JSON -> parse, fast.preverify, apply): {r['full_verify_s']} s = "
        f"{r['entries_verify_per_s']} entries/s = {r['ratio_entries_vs_ed25519']} x the one-core raw rate"
    )
    print(
        f"  CPU: {r['full_verify_cpu_s']} s in this process (parse, preverify's messages, apply), "
        f"{r['full_verify_workers_cpu_s']} s in the signature workers; on idle CPUs at least "
        f"{r['full_verify_100k_floor_s']} s per 100,000 entries"
    )
    print(
        f"  per 100,000 entries: {r['full_verify_100k_s']} s (target <= {TARGET_FULL_S} s: "
        f"{met(r['full_verify_100k_s'] <= TARGET_FULL_S)})"
    )
    for key, value in r.items():
        if key.startswith("entries_verify_per_s."):
            print(f"  preverify mode {key.split('.', 1)[1]}: {value} entries/s (first 20000 entries)")
    if "full_verify_100k_nogc_s" in r:
        print(
            f"  the same with the garbage collector off: {r['full_verify_100k_nogc_s']} s per 100,000 "
            "entries, "
            f"{r['full_verify_nogc_cpu_s']} s CPU in this process"
        )
    incremental_ms = r["incremental_verify_100_ms"]
    print(
        f"incremental verification of 100 new entries (parse + apply with signature checks): median "
        f"{incremental_ms} ms, max {r['incremental_verify_100_max_ms']} ms "
        f"(target <= {TARGET_INCREMENTAL_MS} ms: {met(incremental_ms <= TARGET_INCREMENTAL_MS)})"
    )
    print(
        f"lease check (LedgerState.leases_for over {r['leases']} leases): p50 {r['lease_check_p50_ms']} "
        f"ms, p99 {r['lease_check_p99_ms']} ms (budget: <= {TARGET_LEASE_CHECK_MS} ms added to a "
        f"dispatch: {met(r['lease_check_p99_ms'] <= TARGET_LEASE_CHECK_MS)})"
    )


if __name__ == "__main__":
    main()
