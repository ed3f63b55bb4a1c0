"""`vserver start --workers N`: N server processes on one port over one PostgreSQL database.

The supervisor (the `vserver start` process) prepares what must happen once: the database schema, the
embedded MQTT broker and its account files. It then starts N workers (`python -m vfed.server.workers`), each
a whole server app listening on the same port with SO_REUSEPORT, so the kernel spreads connections among
them. What a request changes reaches the other workers through the database (task waiters through
LISTEN/NOTIFY, vfed.server.pg_events; ledgers, claims and blobs through row locks and constraints), and a
doorbell is rung by the one worker that handled the request, so it is published once. Metrics are summed
over the live workers by whichever worker is scraped (prometheus_client's multiprocess files).

The settings reach a worker through its stdin (never argv or environment, where secrets would show), and
the pipe stays open: a worker whose supervisor is gone sees end-of-file and stops. A worker that exits
while the server is not stopping is logged and started again, with backoff. SIGHUP (TLS reload) is passed
to every worker; SIGINT or SIGTERM stops them all, each finishing its open requests.

SQLite takes writes from one process at a time: more than one worker on SQLite is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from vfed.server import db
from vfed.server.broker_auth import BrokerAccounts
from vfed.server.config import Settings
from vfed.server.embedded import EmbeddedBroker, start_embedded
from vfed.server.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)
READY = b"ready\n"
FAILED = b"error "
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 30.0
RESTART_MAX_S = 30.0
HEALTHY_S = 60.0  # a worker that ran this long restarts without backoff when it dies


class WorkersError(Exception):
    """The server cannot start (or keep) its workers; the message is one line for the operator."""


def sqlite_refusal(settings: Settings, workers: int) -> str | None:
    """Why `workers` processes cannot share this database, or None."""
    if workers > 1 and make_url(settings.db_url()).get_backend_name() == "sqlite":
        return (
            f"--workers {workers} needs PostgreSQL: SQLite takes writes from one process at a time. Set "
            "database_url to postgresql+asyncpg://… or run one worker (the default)"
        )
    return None


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Starts, watches and stops the workers."""

    def __init__(self, settings: Settings, workers: int, log_level: str) -> None:
        self.settings = settings
        self.count = workers
        self.log_level = log_level
        self.workers = [Worker(i) for i in range(workers)]
        self.broker: EmbeddedBroker | None = None
        self.metrics_dir: Path | None = None
        self.stopping = asyncio.Event()
        self.worker_settings = settings

    async def run(self) -> None:
        """Serve until SIGINT/SIGTERM. WorkersError (or db.DatabaseError) when they cannot start."""
        loop = asyncio.get_running_loop()
        try:
            await self._prepare()
            await asyncio.gather(*(self._start(w) for w in self.workers))
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
            log.info(
                "serving on port %s with %d workers (pids %s)",
                self.settings.port,
                self.count,
                " ".join(str(w.proc.pid) for w in self.workers if w.proc is not None),
            )
            watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
            await self.stopping.wait()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._stop_all()
            if self.broker is not None:
                await self.broker.stop()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _prepare(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.open_engine(settings.db_url())
        try:
            await db.prepare(engine, upgrade_schema=settings.auto_migrate)
            mqtt = settings.mqtt
            if mqtt.url is None and mqtt.embedded_broker:
                mqtt = await self._start_broker(engine)
        finally:
            await engine.dispose()
        # the workers: the schema is ready (none migrates), the broker is the supervisor's
        self.worker_settings = settings.model_copy(update={"mqtt": mqtt, "auto_migrate": False})
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="vfed-metrics-"))

    async def _start_broker(self, engine: Any) -> Any:
        """The embedded broker, its account files written first; the workers keep the files current."""
        settings = self.settings
        accounts = BrokerAccounts.from_settings(settings)
        assert accounts.folder is not None  # the embedded broker's folder is always managed
        accounts.load_server_password(settings)
        await accounts.sync(db.make_sessionmaker(engine))
        broker = await start_embedded(settings.mqtt.embedded_port, accounts.folder)
        if broker is None:
            return settings.mqtt.model_copy(update={"embedded_broker": False})
        self.broker = broker
        return settings.mqtt.model_copy(
            update={"url": broker.url, "broker_dir": accounts.folder, "embedded_broker": False}
        )

    async def _start(self, worker: Worker) -> None:
        """Start one worker and wait until it listens; WorkersError with its reason when it cannot."""
        env = {**os.environ, MULTIPROC_ENV: str(self.metrics_dir)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vfed.server.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the supervisor, which stops them
        )
        worker.proc, worker.started_at = proc, time.monotonic()
        worker.pids.append(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        message = pickle.dumps((self.worker_settings, worker.index, self.log_level))
        proc.stdin.write(len(message).to_bytes(8, "big") + message)
        await proc.stdin.drain()  # the pipe stays open: its end tells the worker the supervisor is gone
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b"error did not start listening within %d s\n" % START_TIMEOUT_S
        if line != READY:
            reason = line[len(FAILED) :].decode(errors="replace").strip() if line.startswith(FAILED) else ""
            await self._stop(worker)
            code = proc.returncode
            raise WorkersError(reason or f"worker {worker.index} exited at start (exit code {code})")

    async def _watch(self, worker: Worker) -> None:
        """Start the worker again whenever it exits on its own."""
        delay_s = 0.5
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            self._dead(worker.proc.pid)
            ran_s = time.monotonic() - worker.started_at
            delay_s = 0.5 if ran_s >= HEALTHY_S else min(delay_s * 2, RESTART_MAX_S)
            pid = worker.proc.pid
            log.error("worker %d (pid %s) exited (code %s); starting it again", worker.index, pid, code)
            await asyncio.sleep(delay_s)
            try:
                await self._start(worker)
                worker.restarts += 1
            except WorkersError as exc:
                log.error("worker %d could not start again: %s", worker.index, exc)

    def _forward(self, sig: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self._stop(w) for w in self.workers))

    async def _stop(self, worker: Worker) -> None:
        proc = worker.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("worker %d did not stop within %.0f s: killed", worker.index, STOP_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        self._dead(proc.pid)

    def _dead(self, pid: int) -> None:
        """A worker's live gauges leave the sums (prometheus_client's multiprocess bookkeeping)."""
        if self.metrics_dir is None:
            return
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]


def _watch_parent() -> None:
    """Stop this worker when the supervisor's end of stdin closes (it stopped, or died)."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):  # the raw descriptor: a buffered reader's lock would block interpreter exit
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def _read_settings() -> bytes:
    """The supervisor's length-prefixed message on stdin, read from the raw descriptor (nothing buffered
    ahead, so the parent watch reads the rest)."""
    head = _read_exactly(8)
    return _read_exactly(int.from_bytes(head, "big"))


def _read_exactly(n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = os.read(0, n)
        if not chunk:
            raise SystemExit(
                "vfed.server.workers: started without settings on stdin (vserver start starts it)"
            )
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def worker_main() -> int:
    """One worker: settings from stdin, "ready" or "error <reason>" on stdout, logs on stderr."""
    settings, index, log_level = pickle.loads(_read_settings())  # our own supervisor's pipe
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s"
    )
    out = sys.stdout.buffer

    def say(line: bytes) -> None:
        out.write(line)
        out.flush()

    threading.Thread(target=_watch_parent, daemon=True, name="parent-watch").start()
    from vfed.server.app import create_app
    from vfed.server.blobs import BlobStoreError
    from vfed.server.serve import serve
    from vfed.server.tls import ServerTls, TlsError

    try:
        tls = ServerTls.from_settings(settings.tls)
        app = create_app(settings)
        asyncio.run(
            serve(
                app,
                settings.host,
                settings.port,
                settings.limits,
                tls,
                reuse_port=True,
                on_listening=lambda: say(READY),
            )
        )
    except (TlsError, db.DatabaseError, BlobStoreError) as exc:
        say(FAILED + str(exc).encode() + b"\n")
        return 1
    except OSError as exc:
        what = (
            f"{exc.filename}: {exc.strerror or exc}"
            if exc.filename
            else (f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}")
        )
        say(FAILED + what.encode() + b"\n")
        return 1
    return 0


def run_workers(settings: Settings, workers: int, log_level: str) -> None:
    """`vserver start` with several workers; WorkersError or db.DatabaseError in one line when they fail."""
    refusal = sqlite_refusal(settings, workers)
    if refusal is not None:
        raise WorkersError(refusal)
    asyncio.run(Supervisor(settings, workers, log_level).run())


if __name__ == "__main__":
    sys.exit(worker_main())
