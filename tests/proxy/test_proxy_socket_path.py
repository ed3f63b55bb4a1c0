"""A run's proxy socket under a data folder too deep for a Unix socket's address (sun_path: 107 bytes) still
listens and answers: the proxy binds through a descriptor of its folder."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest
from tests.proxy.proxy_kit import World, world

from vfed.proxy.server import SUN_PATH_MAX, ProxyServer, unix_address

__all__ = ["world"]


def _get(path: Path, target: str) -> tuple[int, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, unix_address(path) as address:
        sock.connect(address)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_socket_path_too_long_for_sun_path_still_serves(world: World, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "sockets" / "1"
    path = deep / "proxy.sock"
    assert len(os.fsencode(path)) > SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as plain, pytest.raises(OSError, match="too long"):
        deep.mkdir(parents=True)
        plain.bind(str(path))  # what the proxy did before: refused by the kernel
    async with ProxyServer(world.ctx, path):
        assert path.is_socket() and oct(path.stat().st_mode & 0o777) == "0o666"
        status, body = await asyncio.to_thread(_get, path, "/run")
    assert status == 200 and isinstance(body, dict) and body["run_id"] == world.parent_run
    assert not path.exists()  # stopping removes the socket at its real path
