"""The fake API server's object store: one resourceVersion counter, an event history for watches.

Lives on the server's event loop only (no locks): handlers, the job controller and the kubelet all run there.
The history is a window, as the real server's watch cache is: the oldest events go once it holds
`max_history` (or when a test calls `compact`), and a watch from a version before the window is Expired (410).
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fakek8s_core import already_exists, generated_name, not_found, now, selector_matches

Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """One served resource: the URL plural, its API group and the kind written into objects."""

    plural: str
    group: str
    version: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass
class Event:
    rv: int
    plural: str
    type: str
    obj: Obj


class Expired(Exception):
    """A watch asked for events from before the history's window."""

    def __init__(self, since: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {since} ({oldest})")


@dataclass
class Store:
    objects: dict[str, dict[tuple[str, str], Obj]] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    rv: int = 1
    compacted: int = 0
    """Events up to this resourceVersion are gone from `history`."""
    max_history: int = 20_000
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # set and replaced on every change

    def _bucket(self, plural: str) -> dict[tuple[str, str], Obj]:
        return self.objects.setdefault(plural, {})

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        found = self._bucket(kind.plural).get((namespace, name))
        if found is None:
            raise not_found(kind.plural, kind.group, name)
        return found

    def find(self, plural: str, namespace: str, name: str) -> Obj | None:
        return self._bucket(plural).get((namespace, name))

    def list(self, plural: str, namespace: str | None, selector: str | None = None) -> list[Obj]:
        return [
            obj
            for (ns, _), obj in sorted(self._bucket(plural).items())
            if (namespace is None or ns == namespace)
            and selector_matches(selector, obj["metadata"].get("labels") or {})
        ]

    def create(
        self, kind: Kind, namespace: str, obj: Obj, prepare: Callable[[Obj], None] | None = None
    ) -> Obj:
        """Fill the server-side metadata (uid, creationTimestamp, resourceVersion, generation, generateName);
        `prepare` then sets the kind's own defaults (a Job's selector needs its uid) before anyone sees it."""
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            for _ in range(20):
                meta["name"] = generated_name(meta["generateName"])
                if (namespace, meta["name"]) not in self._bucket(kind.plural):
                    break
        name = meta["name"]
        if (namespace, name) in self._bucket(kind.plural):
            raise already_exists(kind.plural, kind.group, name)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta["generation"] = 1
        if prepare is not None:
            prepare(obj)
        self._bucket(kind.plural)[(namespace, name)] = obj
        self._record(kind.plural, "ADDED", obj)
        return obj

    def update(self, plural: str, obj: Obj) -> Obj:
        """Record a change of an object already in the store (status, metadata: the spec never changes)."""
        self._record(plural, "MODIFIED", obj)
        return obj

    def remove(self, plural: str, namespace: str, name: str) -> Obj | None:
        obj = self._bucket(plural).pop((namespace, name), None)
        if obj is not None:
            self._record(plural, "DELETED", obj)
        return obj

    def _record(self, plural: str, type_: str, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append(Event(self.rv, plural, type_, copy.deepcopy(obj)))
        if len(self.history) > self.max_history:  # keep the newest half of the window
            self.compact(self.history[-(self.max_history // 2) - 1].rv)
        self._changed.set()
        self._changed = asyncio.Event()

    def compact(self, upto: int | None = None) -> None:
        """Forget the events up to `upto` (default: all so far), as etcd compaction does."""
        upto = self.rv if upto is None else upto
        self.history = [e for e in self.history if e.rv > upto]
        self.compacted = max(self.compacted, upto)

    async def next_change(self) -> None:
        """Returns after the next change to any object."""
        await self._changed.wait()

    async def watch(
        self, plural: str, namespace: str | None, selector: str | None, since: int | None
    ) -> AsyncIterator[Event]:
        """Events after `since`; with no `since`, first a synthetic ADDED per existing object (as the real
        server does for a watch without resourceVersion or with "0"). Expired when `since` is before the
        window, or falls behind it while the watcher is slow."""
        if since is None:
            for obj in self.list(plural, namespace, selector):
                yield Event(int(obj["metadata"]["resourceVersion"]), plural, "ADDED", copy.deepcopy(obj))
            since = self.rv
        last = since
        while True:
            if last < self.compacted:
                raise Expired(last, self.compacted + 1)
            index = bisect.bisect_right(self.history, last, key=lambda e: e.rv)
            if index == len(self.history):
                await self.next_change()
                continue
            event = self.history[index]
            last = event.rv
            if event.plural != plural:
                continue
            if namespace is not None and event.obj["metadata"].get("namespace") != namespace:
                continue
            if selector_matches(selector, event.obj["metadata"].get("labels") or {}):
                yield event
