"""Login brakes and the client's real address.

Failures are counted per key (a client address, an account at an address, a node API-key id); after a few,
each next try must wait longer, up to a ceiling. Nothing is ever locked: a key only slows itself down, so an
attacker failing on purpose against root from his address does not stop root logging in from another one.
The counts live in the server process (they are lost on restart, which only forgives some failures).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from vfed.server.config import LoginSettings
from vfed.server.errors import ApiError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_KEYS = 100_000  # the oldest keys are forgotten first; bounded memory whatever an attacker sends


@dataclass
class Throttle:
    """Failures per key with a delay that doubles from `base_s` after `after` failures, up to `max_s`."""

    after: int
    base_s: float
    max_s: float
    forget_s: float
    clock: Callable[[], float] = time.monotonic
    _failures: dict[Hashable, tuple[int, float]] = field(default_factory=dict)

    def wait_s(self, key: Hashable) -> float:
        """Seconds before `key` may try again (0: now)."""
        hit = self._failures.get(key)
        if hit is None:
            return 0.0
        count, last = hit
        now = self.clock()
        if now - last >= self.forget_s:
            del self._failures[key]
            return 0.0
        if count < self.after:
            return 0.0
        delay = min(self.max_s, self.base_s * 2.0 ** min(count - self.after, 60))
        return max(0.0, last + delay - now)

    def fail(self, key: Hashable) -> None:
        """Count one failure of `key` now."""
        count, last = self._failures.pop(key, (0, 0.0))
        now = self.clock()
        if now - last >= self.forget_s:
            count = 0
        self._failures[key] = (count + 1, now)  # re-inserted: the dict stays ordered oldest first
        while len(self._failures) > MAX_KEYS:
            del self._failures[next(iter(self._failures))]

    def forget(self, key: Hashable) -> None:
        """A success: the key's failures no longer count."""
        self._failures.pop(key, None)


@dataclass
class LoginThrottles:
    """The three brakes: per client address, per account at an address, per node API-key id."""

    address: Throttle
    account: Throttle
    node_key: Throttle

    @classmethod
    def from_settings(cls, cfg: LoginSettings) -> LoginThrottles:
        def make(after: int) -> Throttle:
            return Throttle(after, cfg.throttle_base_s, cfg.throttle_max_s, cfg.throttle_forget_s)

        return cls(make(cfg.address_throttle_after), make(cfg.throttle_after), make(cfg.node_throttle_after))


THROTTLES = web.AppKey("login_throttles", LoginThrottles)


def too_many(wait_s: float) -> ApiError:
    """429 with Retry-After: the same answer whether or not the account exists."""
    seconds = int(wait_s) + 1
    return ApiError(
        429, "too-many-attempts", f"wait {seconds} s before trying again", {"Retry-After": str(seconds)}
    )


def _parse(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(ip: IPAddress | None, proxies: Sequence[IPNetwork]) -> bool:
    return ip is not None and any(ip.version == net.version and ip in net for net in proxies)


def client_address(request: web.Request, trusted_proxies: Sequence[IPNetwork]) -> str:
    """The address of whoever sent the request.

    The peer of the connection, unless that peer is a configured trusted proxy: then X-Forwarded-For is read
    from the right (each proxy appends the address it received from) and the first hop that is not a trusted
    proxy is the client. A forged header from anyone else changes nothing, and neither do the entries a
    client itself put left of what our proxies appended.
    """
    peer = request.remote or ""
    address = _parse(peer)
    if not _trusted(address, trusted_proxies):
        return peer
    hops = [h for value in request.headers.getall("X-Forwarded-For", []) for h in value.split(",")]
    for hop in reversed(hops):
        ip = _parse(hop)
        if ip is None:
            break  # garbage: the last trusted hop is all we know
        address = ip
        if not _trusted(ip, trusted_proxies):
            break
    return str(address)
