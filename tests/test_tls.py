"""HTTPS on the public and admin ports (server.tls_cert_file / tls_key_file), with the
official openai client; a certificate that cannot serve is one clear error."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from distillguard.cli import main
from tests.factories import ADMIN_TOKEN, make_settings, new_api_key, start_stack


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "distillguard test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(_key_pem(key))
    (folder / "other-key.pem").write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    (folder / "locked-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret passphrase")))
    return folder / "cert.pem", folder / "key.pem"


def test_both_ports_serve_https(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    trust = ssl.create_default_context(cafile=str(cert))
    stack = start_stack(make_settings(tmp_path, server={
        "tls_cert_file": str(cert), "tls_key_file": str(key)}))
    try:
        assert stack.stack.base_url.startswith("https://127.0.0.1:")
        assert stack.stack.admin_url.startswith("https://")
        api_key = new_api_key(stack, "t1", verify=trust)
        client = openai.OpenAI(base_url=stack.stack.base_url, api_key=api_key,
                               http_client=httpx.Client(verify=trust))
        answer = client.chat.completions.create(
            model="demo-chat-1", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert answer.choices[0].message.content
        chunks = list(client.chat.completions.create(
            model="demo-chat-1", messages=[{"role": "user", "content": "hi"}],
            max_tokens=5, stream=True))
        assert chunks
        # a client that does not trust the certificate, or speaks plain HTTP, gets nothing
        with pytest.raises(httpx.ConnectError):
            httpx.get(stack.stack.admin_url + "/admin/v1/accounts")
        plain = stack.stack.base_url.replace("https://", "http://") + "/models"
        with pytest.raises(httpx.HTTPError):
            httpx.get(plain, headers={"authorization": f"Bearer {api_key}"}, timeout=5)
        # Both clients keep an idle connection in their pools: closing each waited for
        # the client's TLS close_notify, which never came, 30 s (asyncio's SSL shutdown
        # timeout) before the gateway could stop. A bound on a hang, not a timing.
        started = time.monotonic()
        stack.stop()
        assert time.monotonic() - started < 15
    finally:
        stack.stop()


def test_a_certificate_that_cannot_serve_is_one_clear_error(
        tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    runner = CliRunner()
    for server, message in (
            ({"tls_cert_file": str(cert), "tls_key_file": str(key.parent / "other-key.pem")},
             "cannot serve HTTPS with server.tls_cert_file"),
            ({"tls_cert_file": str(cert), "tls_key_file": str(tmp_path / "missing.pem")},
             "No such file or directory"),
            # an encrypted key: refused, not asked for at a prompt a service never sees
            ({"tls_cert_file": str(cert), "tls_key_file": str(key.parent / "locked-key.pem")},
             "cannot serve HTTPS with server.tls_cert_file"),
            ({"tls_cert_file": str(cert)}, "go together")):
        config = tmp_path / "dg.yaml"
        config.write_text(yaml.safe_dump({"server": server, "admin": {"token": ADMIN_TOKEN},
                                          "state": {"url": f"sqlite:///{tmp_path}/s.db"}}))
        for command in (["check-config"], ["serve"]):
            done = runner.invoke(main, ["-c", str(config), *command])
            assert done.exit_code == 2 and message in done.output, (command, done.output)
            assert "Traceback" not in done.output


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path,
                                                      certificate: tuple[Path, Path]) -> None:
    """OpenSSL asks for a key's passphrase on the terminal: started from one, the
    gateway would wait at "Enter PEM pass phrase:" for an answer a service never gets."""
    import os
    import pty
    import select
    import sys

    cert, key = certificate
    config = tmp_path / "dg.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"tls_cert_file": str(cert),
                   "tls_key_file": str(key.parent / "locked-key.pem")},
        "admin": {"token": ADMIN_TOKEN}, "state": {"url": f"sqlite:///{tmp_path}/s.db"}}))
    pid, terminal = pty.fork()
    if pid == 0:   # the child, on a terminal of its own
        os.execv(sys.executable, [sys.executable, "-m", "distillguard.cli", "-c",
                                  str(config), "check-config"])
    said = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], 0.5)
            if not ready:
                if b"pass phrase" in said:
                    break          # waiting at the prompt
                continue
            try:
                chunk = os.read(terminal, 4096)
            except OSError:        # the child closed its terminal: it ended
                break
            if not chunk:
                break
            said += chunk
    finally:
        if b"pass phrase" in said or time.monotonic() >= deadline:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
    assert b"pass phrase" not in said, said
    assert b"cannot serve HTTPS" in said and os.waitstatus_to_exitcode(status) == 2, said
