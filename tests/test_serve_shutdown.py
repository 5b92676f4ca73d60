"""Stopping a running gateway (SIGTERM, as a service manager does) loses no request it
has accepted: the requests under way are answered before the process ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from tests.factories import ADMIN_TOKEN, StderrLines

CHAT = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5}


def _serve(tmp_path: Path, **server: object) -> tuple[subprocess.Popen[str], StderrLines,
                                                       str, str]:
    cfg = tmp_path / "dg.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"port": 0, "admin_port": 0, **server},
        "admin": {"token": ADMIN_TOKEN}, "upstream": {"base_url": "demo"},
        "state": {"url": f"sqlite:///{tmp_path / 's.sqlite'}"},
        "ledger": {"path": str(tmp_path / "ledger")}}))
    proc = subprocess.Popen([sys.executable, "-m", "distillguard.cli", "-c", str(cfg), "serve"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    output = StderrLines(proc)
    found = output.wait_for(r"gateway on (http://\S+)  admin on (http://\S+)")
    return proc, output, found[1], found[2]


def _api_key(admin_url: str) -> str:
    with httpx.Client(base_url=admin_url, timeout=10,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.post("/admin/v1/accounts", json={"account_id": "acct_stop",
                                               "country": "DE"}).raise_for_status()
        return str(admin.post("/admin/v1/accounts/acct_stop/keys", json={}).json()["key"])


def _begin_request(base_url: str, key: str, body: bytes, sent: int) -> socket.socket:
    """A connection on which a chat request's head and the first ``sent`` bytes of its
    body have gone out: accepted by the gateway, not yet complete."""
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    head = (f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body[:sent])
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict[str, object]]:
    """The status and JSON body of the one response on ``sock`` (read to its close)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload)


def test_sigterm_answers_a_request_under_way_before_the_gateway_stops(tmp_path: Path) -> None:
    """With the built-in demo upstream, the upstream's server used to stop first: a
    request the gateway had accepted but not yet forwarded when SIGTERM came was answered
    502, and the process ended by the signal. Now the gateway stops taking new
    connections, answers what it has, and only then stops its upstream and exits 0."""
    proc, output, base_url, admin_url = _serve(tmp_path)
    try:
        key = _api_key(admin_url)
        body = json.dumps(CHAT).encode()
        sock = _begin_request(base_url, key, body, 10)
        time.sleep(0.5)                       # the head has been read
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(1.5)                       # long enough for any server to have stopped
        url = urlsplit(base_url)
        try:                                  # no new connection is taken now
            socket.create_connection((url.hostname, url.port), timeout=5).close()
            refused = False
        except OSError:
            refused = True
        sock.sendall(body[10:])
        status, answer = _answer(sock)
        assert status == 200, answer
        assert answer["object"] == "chat.completion"
        assert refused
        assert proc.wait(timeout=30) == 0, output.text(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        output.text(timeout=30)


def test_a_request_that_outlasts_the_shutdown_timeout_does_not_hold_the_gateway(
        tmp_path: Path) -> None:
    """``server.shutdown_timeout_s`` bounds the wait: a client that never finishes its
    request does not keep a stopping gateway alive."""
    proc, output, base_url, admin_url = _serve(tmp_path, shutdown_timeout_s=1,
                                               read_timeout_s=60.0)
    try:
        key = _api_key(admin_url)
        body = json.dumps(CHAT).encode()
        sock = _begin_request(base_url, key, body, 10)     # and nothing more
        time.sleep(0.5)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, output.text(timeout=5)
        assert time.monotonic() - started < 20    # not the 60 s read timeout
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        output.text(timeout=30)
