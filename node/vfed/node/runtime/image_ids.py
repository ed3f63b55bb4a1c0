"""Image reference -> local image ID, remembered while Docker's image event stream is up.

Why: a run's start asked the engine for the image's ID every time (an inspect, a thread hop and ~2-5 ms on
the start path). Any image event (tag, untag, delete, pull, load, import) empties the whole cache: events are
rare, and a rule that simple cannot miss a retag. While the stream is down nothing is cached and every lookup
asks the engine, as before. The agent still starts the container by the ID it checked, so a cached answer
never lets another image run than the one the policy saw.
"""

from __future__ import annotations

import threading


class ImageIds:
    """Thread-safe: the event reader (a thread) invalidates, the loop reads and stores."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, str] = {}
        self._generation = 0
        self._live = False
        self.hits = 0
        self.misses = 0

    @property
    def live(self) -> bool:
        return self._live

    def get(self, reference: str) -> tuple[str | None, int]:
        """(the cached ID or None, the generation to hand back to `store` after asking the engine)."""
        with self._lock:
            found = self._ids.get(reference) if self._live else None
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found, self._generation

    def store(self, reference: str, image_id: str, generation: int) -> None:
        """Remember an engine answer, unless an event (or a drop of the stream) came since it was asked."""
        with self._lock:
            if self._live and generation == self._generation:
                self._ids[reference] = image_id

    def invalidate(self) -> None:
        """An image event: forget everything; answers asked before it are not stored either."""
        with self._lock:
            self._ids.clear()
            self._generation += 1

    def set_live(self, live: bool) -> None:
        """The event stream is subscribed (True) or gone (False); either way start from nothing."""
        with self._lock:
            self._ids.clear()
            self._generation += 1
            self._live = live
