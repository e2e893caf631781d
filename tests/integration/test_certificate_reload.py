"""SIGHUP reloads listener certificates: new handshakes get the new one, live sessions go on.

``python -m smtpwarden run`` with a STARTTLS listener; the certificate files
are replaced and the process gets SIGHUP.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import yaml

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import POLL_S, WAIT_S
from integration.test_relay_signals import RelayProcess

RELOADED = "certificate reloaded"
NOT_RELOADED = "certificate not reloaded"


def write_certificate(ca: trustme.CA, folder: Path, name: str) -> None:
    issued = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    (folder / "cert.pem").write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(folder / "key.pem"))


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def relay(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream, ca: trustme.CA
) -> Iterator[RelayProcess]:
    write_certificate(ca, tmp_path, "first.relay.test")
    log_path = tmp_path / "transactions.jsonl"
    config = tmp_path / "smtpwarden.yaml"
    listener = {
        "name": "main",
        "host": "127.0.0.1",
        "port": 0,
        "upstream": "up",
        "tls": {"certificate": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")},
    }
    config.write_text(
        yaml.safe_dump(
            {
                "event_loop": loop_kind,
                "hostname": "relay.test",
                "listeners": [listener],
                "upstreams": [{"name": "up", **raw_upstream.config}],
                "log": {"transactions": str(log_path), "sessions": True, "level": "info"},
            }
        ),
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpwarden", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = RelayProcess(process=process, log_path=log_path)
    reader = threading.Thread(target=running.read_stderr, daemon=True)
    reader.start()
    try:
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT_S)
        reader.join(WAIT_S)
        if process.stderr is not None:
            process.stderr.close()


def subject_of(client: smtplib.SMTP) -> str:
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    cert = sock.getpeercert()
    assert cert is not None
    names = dict(item[0] for item in cert["subject"])
    return str(names["commonName"])


def secure_client(address: tuple[str, int], ca: trustme.CA) -> smtplib.SMTP:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client = smtplib.SMTP(*address, timeout=WAIT_S)
    client.ehlo("client.test")
    client.starttls(context=context)
    client.ehlo("client.test")
    return client


def wait_for_line(relay: RelayProcess, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in relay.output():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{relay.output()}")
        time.sleep(POLL_S)


def test_sighup_reloads_the_certificate_for_new_sessions(
    relay: RelayProcess, ca: trustme.CA, tmp_path: Path
) -> None:
    address = relay.wait_ready()
    with secure_client(address, ca) as before:
        assert subject_of(before) == "first.relay.test"
        write_certificate(ca, tmp_path, "second.relay.test")
        relay.process.send_signal(signal.SIGHUP)
        wait_for_line(relay, RELOADED)
        with secure_client(address, ca) as after:
            assert subject_of(after) == "second.relay.test"
            after.sendmail("a@example.org", ["b@example.net"], "Subject: x\r\n\r\nnew\r\n")
        # The session opened before the reload goes on with its certificate.
        assert before.noop()[0] == 250
        before.sendmail("a@example.org", ["b@example.net"], "Subject: y\r\n\r\nold\r\n")
    assert relay.process.poll() is None


def test_a_broken_certificate_is_refused_and_the_old_one_kept(
    relay: RelayProcess, ca: trustme.CA, tmp_path: Path
) -> None:
    address = relay.wait_ready()
    (tmp_path / "key.pem").write_text("not a key\n", encoding="ascii")
    relay.process.send_signal(signal.SIGHUP)
    wait_for_line(relay, NOT_RELOADED)
    with secure_client(address, ca) as client:
        assert subject_of(client) == "first.relay.test"
        assert client.noop()[0] == 250
    assert relay.process.poll() is None
