"""Probes the three-machine test runs *inside* a namespace (`ip netns exec NS python probe.py ...`): what a
party on that machine sees when it talks to the server or the broker. Prints one JSON object; exit 0 unless
the probe itself could not run.

Run as a file, not imported: the test process sits in the host's network namespace, where 198.18.0.0/15 is
not reachable on purpose.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any


def wait_http(url: str, timeout_s: float, ca_file: str | None) -> dict[str, Any]:
    """GET url until it answers 200 (the server is up and its database answers) or the time is up."""
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                if answer.status == 200:
                    return {"ok": True}
                last = f"status {answer.status}"
        except (OSError, urllib.error.URLError) as exc:
            last = f"{exc.__class__.__name__}: {exc}"
        time.sleep(0.2)
    return {"ok": False, "last": last}


def plain_http(host: str, port: int) -> dict[str, Any]:
    """A plain-text HTTP request to host:port: the status line that came back, if any."""
    request = f"GET /api/v1/health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(request)
            received = b""
            while len(received) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                received += chunk
    except OSError as exc:
        return {"status_line": None, "error": f"{exc.__class__.__name__}: {exc}"}
    first = received.split(b"\r\n", 1)[0].decode("latin-1") if received else None
    return {"status_line": first, "bytes": len(received), "error": None}


def _mqtt_client(args: argparse.Namespace, client_id: str) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if args.username is not None:
        password = None
        if args.password_file:
            with open(args.password_file) as fh:
                password = fh.read().strip()
        client.username_pw_set(args.username, password)
    if args.tls:
        client.tls_set(ca_certs=args.ca_file)
    return client


def mqtt(args: argparse.Namespace) -> dict[str, Any]:
    """Connect (with or without credentials); then, if asked, subscribe to and publish on topics. Reports the
    CONNACK, each SUBACK and each PUBACK reason code (MQTT 5: >= 0x80 is a refusal), and with --listen the
    number of messages that arrived per topic."""
    connected = threading.Event()
    acks: dict[int, threading.Event] = {}
    codes: dict[int, int] = {}
    out: dict[str, Any] = {"connack": None, "subscribe": {}, "publish": {}}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        out["connack"] = int(reason.value)
        connected.set()

    def on_connect_fail(client: Any, userdata: Any) -> None:
        connected.set()

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        codes[mid] = int(reasons[0].value)
        acks.setdefault(mid, threading.Event()).set()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        codes[mid] = int(reason.value)
        acks.setdefault(mid, threading.Event()).set()

    received: dict[str, int] = {}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _n, _f: stop.set())

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        received[message.topic] = received.get(message.topic, 0) + 1

    client = _mqtt_client(args, f"probe-{time.monotonic_ns()}")
    client.on_connect = on_connect
    client.on_connect_fail = on_connect_fail
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    try:
        client.connect(args.host, args.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        out["error"] = f"{exc.__class__.__name__}: {exc}"
        return out
    client.loop_start()
    try:
        if not connected.wait(10) or out["connack"] != 0:
            return out
        for topic in args.subscribe:
            _result, mid = client.subscribe(topic, qos=1)
            event = acks.setdefault(mid, threading.Event())
            out["subscribe"][topic] = codes[mid] if event.wait(10) else None
        for topic in args.publish:
            info = client.publish(topic, b'{"event": "probe"}', qos=1)
            event = acks.setdefault(info.mid, threading.Event())
            out["publish"][topic] = codes[info.mid] if event.wait(10) else None
        if args.listen > 0:
            # Subscribed: the test may now make the server publish. Collect what arrives until the test
            # sends SIGTERM or the time is up.
            print("READY", file=sys.stderr, flush=True)
            stop.wait(args.listen)
            out["received"] = dict(received)
    finally:
        client.disconnect()
        client.loop_stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="probe", required=True)
    wait = sub.add_parser("wait-http")
    wait.add_argument("url")
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.add_argument("--ca-file")
    plain = sub.add_parser("plain-http")
    plain.add_argument("host")
    plain.add_argument("port", type=int)
    broker = sub.add_parser("mqtt")
    broker.add_argument("host")
    broker.add_argument("port", type=int)
    broker.add_argument("--username")
    broker.add_argument("--password-file")
    broker.add_argument("--tls", action="store_true")
    broker.add_argument("--ca-file")
    broker.add_argument("--subscribe", action="append", default=[])
    broker.add_argument("--publish", action="append", default=[])
    broker.add_argument("--listen", type=float, default=0.0, help="then collect messages (until SIGTERM)")
    args = parser.parse_args()
    if args.probe == "wait-http":
        result = wait_http(args.url, args.timeout, args.ca_file)
    elif args.probe == "plain-http":
        result = plain_http(args.host, args.port)
    else:
        result = mqtt(args)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
