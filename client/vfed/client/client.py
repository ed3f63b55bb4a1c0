"""The researcher's client: create tasks with end-to-end encrypted input, wait, read decrypted results.

`AsyncClient` is the implementation; `Client` wraps it for plain scripts and notebooks by running its
coroutines on a private event loop thread, so it works inside Jupyter's own running loop as well.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

from vfed.client import credentials, identity, ledger, run_logs, tasks
from vfed.client.catalog import DatasetInfo, LeaseInfo, ReceiptInfo
from vfed.client.credentials import default_key_file, default_trust_file
from vfed.client.errors import ApiError, KeyMissing, NotLoggedIn
from vfed.client.http import ApiSession
from vfed.client.identity import Identity
from vfed.client.ledger import LedgerViews, fabric_ledgers_from_env
from vfed.client.members import Members
from vfed.client.results import ResultSet
from vfed.client.tasks import CreatedTask
from vfed.client.trust import ClientTrust, OrganizationTrust, trust_mode
from vfed.common.api.resources import Collaboration, Node, Organization, Run, Task
from vfed.common.crypto import Keyring
from vfed.common.ledger import LedgerView
from vfed.common.ledger.fabric_settings import FabricSettings
from vfed.common.trust import Pin
from vfed.common.trust.truststore import NamedPin

T = TypeVar("T")


class TaskFilters(TypedDict, total=False):
    """The filters of `tasks()`, each a query parameter of `GET /tasks`."""

    collaboration_id: int | None
    parent_id: int | None
    job_id: int | None
    status: str | None


TaskRef = int | Task | Mapping[str, Any]
"""A task by its id, as a Task, or as the JSON object of one."""
RunRef = int | Run | Mapping[str, Any]
"""A run by its id, as a Run, or as the JSON object of one."""
DEFAULT_URL = "http://127.0.0.1:7600"
LOGIN_AGAIN = "run `vfed login` again"


class SavedLoginSession(ApiSession):
    """The session of a client built from `vfed login`'s file: a refreshed token is written back to that file
    (so the next `vfed` command or notebook keeps working), and tokens another process refreshed meanwhile
    are picked up from it before refreshing (the server rotates refresh tokens and takes a second use of one
    for theft). A refresh the server refuses raises NotLoggedIn saying to log in again."""

    def __init__(self, url: str, saved: dict[str, Any], ca_file: str | Path | None) -> None:
        super().__init__(
            url, token=saved.get("access_token"), refresh_token=saved.get("refresh_token"), ca_file=ca_file
        )
        self.persist = True
        self.username = saved.get("username")

    async def login(self, username: str, password: str) -> dict[str, Any]:
        self.persist = False  # an explicit login in this session: the saved file is left alone from now on
        return await super().login(username, password)

    async def logout(self) -> None:
        self.persist = False
        await super().logout()

    async def _refresh_now(self) -> bool:
        if not self.persist:
            return await super()._refresh_now()
        saved = credentials.load()
        if (
            credentials.same_server(saved.get("url"), self.base.removesuffix("/api/v1"))
            and saved.get("username") == self.username
            and saved.get("refresh_token")
            and saved["refresh_token"] != self.refresh_token
        ):
            self.refresh_token = str(saved["refresh_token"])  # another process refreshed: use its token
        old = self.refresh_token
        try:
            body = await self.request("POST", "/token/refresh", json={"refresh_token": old}, auth=False)
        except ApiError as exc:
            if exc.status in (400, 401, 403):
                raise NotLoggedIn(
                    f"the server refused the saved login's refresh token ({exc.error}): {LOGIN_AGAIN}"
                ) from None
            raise
        self.token = str(body["access_token"])
        self.refresh_token = str(body.get("refresh_token") or old)
        credentials.update_tokens(
            self.base.removesuffix("/api/v1"), self.username, old, self.token, self.refresh_token
        )
        return True


class AsyncClient:
    """Async researcher client.

    Key: `key_file`, else VFED_KEY_FILE, else the key `vfed keys generate` made (passphrase:
    VFED_KEY_PASSPHRASE); it is the researcher's own certified key or the organization's keyring.
    Trust: pins in `trust_file` (VFED_TRUST_FILE, else `trusted_orgs` in the config folder); `trust` is
    `tofu` (default, VFED_TRUST: pin an organization at first sight, like ssh) or `pinned` (refuse any
    organization not pinned with `trust()` / `vfed trust` beforehand).
    HTTPS: the server's certificate is verified against `ca_file` (else VFED_CA_FILE, else the system's
    CAs) and the URL's host name.
    Login: with no `url` and no `token` (nor VFED_TOKEN), the login `vfed login` saved is used when there is
    one (its server URL, CA file, tokens and key file, each unless given here) and tokens refreshed in a long
    session are saved back to it; `from_login()` insists on it. An explicit `url` or `token` never reads nor
    writes the saved file: call `login()` then, or pass the token.
    Ledgers: a collaboration's ledger is read from the server (the embedded ledger) unless `fabric_ledgers`
    (else the YAML file VFED_FABRIC_LEDGERS names: collaboration id -> settings) says which Fabric channel
    keeps it (docs/ledger.md, "The Fabric backend").
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        key_file: str | Path | None = None,
        passphrase: str | None = None,
        token: str | None = None,
        trust_file: str | Path | None = None,
        trust: str | None = None,
        ca_file: str | Path | None = None,
        fabric_ledgers: Mapping[int, FabricSettings] | None = None,
        _login: dict[str, Any] | None = None,
    ) -> None:
        self.fabric_ledgers: dict[int, FabricSettings] = (
            dict(fabric_ledgers) if fabric_ledgers is not None else fabric_ledgers_from_env()
        )
        saved = _login if _login is not None else {}
        if _login is None and url is None and token is None and not os.environ.get("VFED_TOKEN"):
            saved = _saved_login()
            env_url = os.environ.get("VFED_SERVER_URL")
            if env_url and not credentials.same_server(env_url, saved.get("url")):
                saved = {}  # VFED_SERVER_URL names another server: its tokens are not this login's
        self.url = url or saved.get("url") or os.environ.get("VFED_SERVER_URL", DEFAULT_URL)
        self.api: ApiSession
        if saved:
            key_file = key_file or saved.get("key_file")
            ca_file = ca_file or saved.get("ca_file")
        ca = ca_file or os.environ.get("VFED_CA_FILE") or None
        if saved:
            self.api = SavedLoginSession(self.url, saved, ca)
        else:
            self.api = ApiSession(self.url, token=token or os.environ.get("VFED_TOKEN"), ca_file=ca)
        self.members = Members(self.api)
        self.chains = ClientTrust(self.api, Path(trust_file or default_trust_file()), trust_mode(trust))
        self._key_file = key_file or os.environ.get("VFED_KEY_FILE")
        self._passphrase = passphrase if passphrase is not None else os.environ.get("VFED_KEY_PASSPHRASE")
        self._keyring: Keyring | None = None
        self._identity: Identity | None = None
        self.organization_id: int | None = None
        self.user_id: int | None = None
        self.descriptor_digests: dict[int, str] = {}  # task id -> digest of the descriptor we signed
        self.ledgers = LedgerViews(self)
        if saved.get("user_id") is not None and saved.get("organization_id") is not None:
            self.user_id, self.organization_id = int(saved["user_id"]), int(saved["organization_id"])

    @classmethod
    def from_login(cls, url: str | None = None, **kwargs: Any) -> AsyncClient:
        """The client of the login `vfed login` saved (server URL, CA file, tokens, key file; keyword
        arguments such as key_file= or ca_file= override the saved ones). A refreshed token is saved back.
        NotLoggedIn when there is no saved login, or when `url` names another server than the saved one."""
        saved = _saved_login(required=True)
        if url is not None and not credentials.same_server(url, saved.get("url")):
            raise NotLoggedIn(
                f"the saved login is for {saved.get('url')}, not {url}: run `vfed login --url {url}`"
            )
        if kwargs.get("token") is not None:
            raise TypeError("from_login() takes its token from the saved login; pass token= to AsyncClient()")
        return cls(None, _login=saved, **kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections (also what leaving `async with` does)."""
        await self.ledgers.close()
        await self.api.close()

    @property
    def keyring(self) -> Keyring:
        """The key this client signs and opens with, loaded on first use (KeyMissing when there is none)."""
        if self._keyring is None:
            path = Path(self._key_file) if self._key_file else default_key_file()
            if not self._key_file and not path.exists():
                raise KeyMissing(
                    "no key: run `vfed keys generate` (then have it certified), pass key_file= or set "
                    "VFED_KEY_FILE"
                )
            self._keyring = Keyring.load(path, self._passphrase)
        return self._keyring

    def use_keyring(self, keyring: Keyring) -> None:
        """Sign and open with this keyring instead of the key file's."""
        self._keyring = keyring
        self._identity = None

    async def login(self, username: str, password: str) -> None:
        """Log in with a user name and password (a client made with an explicit URL); the tokens stay in
        this client, the saved login of `vfed login` is not touched."""
        body = await self.api.login(username, password)
        self.organization_id = int(body["organization_id"])
        self.user_id = int(body["user_id"]) if body.get("user_id") is not None else None
        self._identity = None

    async def identity(self) -> Identity:
        """Who signs this client's descriptors: its certified researcher key, or its organization."""
        if self._identity is None:
            self._identity = await identity.resolve(self)
        return self._identity

    def trust(self, organization_id: int, fingerprint: str, head: str | None = None) -> Pin:
        """Pin an organization by the fingerprint of its first key (compared with its admin out of band)."""
        return self.chains.pin(organization_id, fingerprint, head, note="pinned by the researcher")

    def untrust(self, organization_id: int) -> bool:
        """Remove an organization's pin; False when it was not pinned."""
        return self.chains.unpin(organization_id)

    def trusted(self) -> list[Pin]:
        """The organizations pinned in the trust file."""
        return self.chains.pins()

    async def trust_from_file(self, path: str | Path) -> tuple[list[NamedPin], list[str]]:
        """Pin the organizations a federation file (`vserver import`'s) names with fingerprints, their ids
        looked up by name: (the pins, the names without a fingerprint). This trusts whoever wrote the file
        (the server's operator in a single-operator setup)."""
        return await self.chains.pin_from_file(Path(path))

    async def organizations_with_trust(self) -> list[OrganizationTrust]:
        """Every visible organization with the fingerprint of its first key and `pinned`: yes, no or
        MISMATCH (pins nothing, whatever the trust mode)."""
        return await self.chains.status(await self.organizations())

    async def organizations(self) -> list[Organization]:
        """The organizations you may see (those of your collaborations): id, name, current public key."""
        return await self.api.get_models("/organizations", Organization)

    async def collaborations(self) -> list[Collaboration]:
        """The collaborations your organization is a member of: id, name and member organizations."""
        return await self.api.get_models("/collaborations", Collaboration)

    async def nodes(self, collaboration: int | None = None, organization: int | None = None) -> list[Node]:
        """Nodes you may see (of one collaboration or organization if given), each with `status` online or
        offline and `last_seen_at`."""
        params = {"collaboration_id": collaboration, "organization_id": organization}
        return await self.api.get_models("/nodes", Node, params)

    async def tasks(self, **filters: Unpack[TaskFilters]) -> list[Task]:
        """Tasks you may see, oldest first, filtered by `collaboration_id`, `parent_id` (the subtasks of one
        task), `job_id` (the tasks of one job: the root task's id) and `status` (pending, active, completed,
        failed, killed); filters left out or None are not applied."""
        return await self.api.get_models("/tasks", Task, dict(filters))

    async def task(self, task_id: int) -> Task:
        """One task: status, image, collaboration, target organizations, datasets, parent, creator."""
        return Task.model_validate(await self.api.request("GET", f"/tasks/{task_id}"))

    async def runs(self, task_id: int) -> list[Run]:
        """The task's runs, one per target organization: status, exit code, classified reason."""
        return await self.api.get_models("/runs", Run, {"task_id": task_id})

    async def run(self, run_id: int) -> Run:
        """One run."""
        return Run.model_validate(await self.api.request("GET", f"/runs/{run_id}"))

    async def run_log(self, run: RunRef) -> str:
        """The run's log tail, opened with this client's key: readable by the run's organization (its
        keyring) and, when that node shares logs, the initiator; LogUnreadable otherwise."""
        if isinstance(run, Run | Mapping):
            found = Run.model_validate(run)
        else:
            found = await self.run(run)
        return await run_logs.run_log(self, found)

    async def ledger(self, collaboration: int) -> LedgerView:
        """The collaboration's ledger as this client verified it, synced now (`.state` says what it holds,
        `.head` is its head). LedgerForked / LedgerTampered (naming the entry) when the server rewrote what
        was verified before; LedgerUnavailable when the server keeps no ledger there."""
        return await self.ledgers.view(collaboration)

    async def datasets(self, collaboration: int | None = None) -> list[DatasetInfo]:
        """Datasets on the ledger (of one collaboration, or of every one you see): owner, label, description,
        and the leases granted to you with their terms and, where your key opens it, the sealed metadata."""
        return await ledger.datasets(self, collaboration)

    async def leases(
        self, collaboration: int | None = None, *, expiring_within_s: float | None = None
    ) -> list[LeaseInfo]:
        """Leases granted to your organization (and to you, where a lease names users) with their status,
        expiry, images, runs and epsilon used; `expiring_within_s`: only active ones expiring that soon."""
        return await ledger.leases(self, collaboration, expiring_within_s)

    async def receipts(
        self, collaboration: int | None = None, *, task: int | None = None
    ) -> list[ReceiptInfo]:
        """Run receipts on the ledger (signed by the executing organizations), of one task if given."""
        return await ledger.receipts(self, collaboration, task)

    async def create_task(
        self,
        collaboration: int,
        image: str,
        method: str,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        organizations: Sequence[int] | None = None,
        datasets: Sequence[str] = (),
        name: str | None = None,
        description: str = "",
    ) -> CreatedTask:
        """Create a task: `method(*args, **kwargs)` of `image` at each of `organizations` (default: every
        member of `collaboration`). `datasets`: the labels of the node datasets mounted for the runs (a
        federated method needs those it declares; a central method's subtasks ask for their own). The input
        is encrypted once for every target organization and the task descriptor is signed with this
        client's key. `name` defaults to the method; `description` is free text. Returns the task, with the
        digest of the descriptor signed for it."""
        return await tasks.create(
            self,
            collaboration,
            image,
            method,
            list(args),
            kwargs or {},
            None if organizations is None else list(organizations),
            list(datasets),
            name or method,
            description,
        )

    async def wait(self, task: TaskRef, timeout_s: float | None = None, progress: bool = True) -> Task:
        """Waits until every run of the task finished; shows progress; returns the task. Cancelled (Ctrl-C
        under `asyncio.run` or a notebook's interrupt) it stops waiting, not the task, and says so on stderr
        as `vfed task wait` does, then lets the cancellation go on; a KeyboardInterrupt raised inside it
        becomes WaitInterrupted, as in `Client.wait`."""
        task_id = _task_id(task)
        try:
            return await tasks.wait(self, task_id, timeout_s, progress)
        except asyncio.CancelledError:
            print(interrupted_message(task_id, f"client.kill({task_id})"), file=sys.stderr, flush=True)
            raise
        except KeyboardInterrupt:
            raise WaitInterrupted(task_id) from None

    async def results(
        self, task: TaskRef, raise_on_failure: bool = True, *, to: str | Path | None = None
    ) -> ResultSet:
        """Decrypted results, one per run in organization order, as a ResultSet (a sequence of the values,
        with `.by_organization`, `.organizations`, `.failures` and `.to_dataframe()`). A failed run raises
        TaskFailed (a RunFailed) naming every failed run, of the task and of its subtasks at any depth;
        with `raise_on_failure=False` a failed run's value is its RunFailed and `.failures` lists them.

        `to`: a folder (made if missing) each result streams to in bounded memory, as
        `organization-<org id>-run-<run id>.parquet` (a table) or `.json` (vfed's result document), instead
        of being held in memory; each OrganizationResult's `file` names it and its `value` is read from it
        on first access. A transfer broken off resumes, also in a later call (the sealed partial
        `organization-<org id>-run-<run id>.sealed.part` stays until it decrypts); a result that does not
        decrypt raises ResultMismatch and leaves no file."""
        folder = None if to is None else Path(to)
        return await tasks.results(self, _task_id(task), raise_on_failure, folder)

    async def kill(self, task: TaskRef) -> Task:
        """Stop every unfinished run of the task (and of its subtasks); returns the task."""
        return Task.model_validate(await self.api.request("POST", f"/tasks/{_task_id(task)}/kill"))


def _task_id(task: TaskRef) -> int:
    return int(task["id"]) if isinstance(task, Task | Mapping) else int(task)


def _saved_login(required: bool = False) -> dict[str, Any]:
    """The login `vfed login` saved, if it has a URL and tokens; {} else (NotLoggedIn when `required`)."""
    saved = credentials.load()
    if saved.get("url") and saved.get("access_token") and saved.get("refresh_token"):
        return saved
    if required:
        raise NotLoggedIn(
            f"no saved login in {credentials.credentials_path()}: run `vfed login --url URL --username NAME`"
        )
    return {}


def interrupted_message(task_id: int, how_to_kill: str) -> str:
    """What an interrupted wait says: the task is not stopped, and how to stop it."""
    return f"stopped waiting for task {task_id}; the task goes on at the nodes ({how_to_kill} stops it)"


class WaitInterrupted(KeyboardInterrupt):
    """Ctrl-C in `Client.wait`: waiting stopped, the task did not (`client.kill(task)` stops it)."""

    def __init__(self, task_id: int) -> None:
        super().__init__(interrupted_message(task_id, f"client.kill({task_id})"))
        self.task_id = task_id


class Client:
    """Blocking face of AsyncClient for scripts and notebooks (same methods, same arguments)."""

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vfed-client", daemon=True)
        self._thread.start()
        try:
            self._async = self._call(_make_async(url, kwargs))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            raise

    @classmethod
    def from_login(cls, url: str | None = None, **kwargs: Any) -> Client:
        """The client of the login `vfed login` saved (see AsyncClient.from_login)."""
        return cls(url, _from_login=True, **kwargs)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def organization_id(self) -> int | None:
        """Your organization's id, known once logged in (None before)."""
        return self._async.organization_id

    def use_keyring(self, keyring: Keyring) -> None:
        self._async.use_keyring(keyring)

    def trust(self, organization_id: int, fingerprint: str, head: str | None = None) -> Pin:
        return self._async.trust(organization_id, fingerprint, head)

    def untrust(self, organization_id: int) -> bool:
        return self._async.untrust(organization_id)

    def trusted(self) -> list[Pin]:
        return self._async.trusted()

    def trust_from_file(self, path: str | Path) -> tuple[list[NamedPin], list[str]]:
        return self._call(self._async.trust_from_file(path))

    def organizations_with_trust(self) -> list[OrganizationTrust]:
        return self._call(self._async.organizations_with_trust())

    def login(self, username: str, password: str) -> None:
        self._call(self._async.login(username, password))

    def organizations(self) -> list[Organization]:
        return self._call(self._async.organizations())

    def collaborations(self) -> list[Collaboration]:
        return self._call(self._async.collaborations())

    def nodes(self, collaboration: int | None = None, organization: int | None = None) -> list[Node]:
        return self._call(self._async.nodes(collaboration, organization))

    def tasks(self, **filters: Unpack[TaskFilters]) -> list[Task]:
        return self._call(self._async.tasks(**filters))

    def task(self, task_id: int) -> Task:
        return self._call(self._async.task(task_id))

    def runs(self, task_id: int) -> list[Run]:
        return self._call(self._async.runs(task_id))

    def run(self, run_id: int) -> Run:
        return self._call(self._async.run(run_id))

    def run_log(self, run: RunRef) -> str:
        return self._call(self._async.run_log(run))

    def ledger(self, collaboration: int) -> LedgerView:
        return self._call(self._async.ledger(collaboration))

    def datasets(self, collaboration: int | None = None) -> list[DatasetInfo]:
        return self._call(self._async.datasets(collaboration))

    def leases(
        self, collaboration: int | None = None, *, expiring_within_s: float | None = None
    ) -> list[LeaseInfo]:
        return self._call(self._async.leases(collaboration, expiring_within_s=expiring_within_s))

    def receipts(self, collaboration: int | None = None, *, task: int | None = None) -> list[ReceiptInfo]:
        return self._call(self._async.receipts(collaboration, task=task))

    def create_task(
        self,
        collaboration: int,
        image: str,
        method: str,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        organizations: Sequence[int] | None = None,
        datasets: Sequence[str] = (),
        name: str | None = None,
        description: str = "",
    ) -> CreatedTask:
        return self._call(
            self._async.create_task(
                collaboration,
                image,
                method,
                args=args,
                kwargs=kwargs,
                organizations=organizations,
                datasets=datasets,
                name=name,
                description=description,
            )
        )

    def wait(self, task: TaskRef, timeout_s: float | None = None, progress: bool = True) -> Task:
        """As AsyncClient.wait; Ctrl-C stops waiting (not the task) and raises WaitInterrupted, a
        KeyboardInterrupt saying so and that `client.kill(task)` stops the task."""
        # tasks.wait, not AsyncClient.wait: cancelled below, that would print what WaitInterrupted says
        fut = asyncio.run_coroutine_threadsafe(
            tasks.wait(self._async, _task_id(task), timeout_s, progress), self._loop
        )
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise WaitInterrupted(_task_id(task)) from None

    def results(
        self, task: TaskRef, raise_on_failure: bool = True, *, to: str | Path | None = None
    ) -> ResultSet:
        return self._call(self._async.results(task, raise_on_failure, to=to))

    def kill(self, task: TaskRef) -> Task:
        return self._call(self._async.kill(task))


async def _make_async(url: str | None, kwargs: dict[str, Any]) -> AsyncClient:
    if kwargs.pop("_from_login", False):
        return AsyncClient.from_login(url, **kwargs)
    return AsyncClient(url, **kwargs)
