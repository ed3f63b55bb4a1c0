"""A client that sends a request head one byte a second: what a server's head deadline must cut off."""

from __future__ import annotations

import select
import socket


def trickle_head(sock: socket.socket, head: bytes) -> tuple[int, int]:
    """Send `head` over the connected `sock` one byte a second until the peer closes; (bytes sent, of)."""
    sent = 0
    for byte in head:
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # reset: the peer closed it
            break
        sent += 1
        readable, _, _ = select.select([sock], [], [], 1.0)
        if readable:
            try:
                if sock.recv(1024) == b"":
                    break
            except ConnectionResetError:  # closed with bytes of ours still unread there: a reset, not a FIN
                break
    return sent, len(head)
