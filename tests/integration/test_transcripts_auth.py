"""Transcripts of AUTH sessions: every mechanism captured, no secret kept.

The relay captures every session (mode always) while clients authenticate
with PLAIN, LOGIN, CRAM-MD5 and XOAUTH2 over STARTTLS, with and without an
initial response, with a wrong secret first, with AUTH refused before TLS
(its response lines pipelined after it), with a response line that is not
base64, and with an XCLIENT LOGIN the relay refuses. Then every transcript
is searched for each secret, in every encoding the client used: none may
be there, while each identity is.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.auth_upstream import MECHANISMS, AuthUpstream
from integration.pki import Pki
from integration.relay_harness import StartRelay, WireClient
from integration.test_auth import (
    CREDENTIALS,
    CRLF,
    TOKENS,
    USERS,
    WRONG,
    authenticate,
    b64,
    base64_forms,
    cram_challenges,
    cram_digest,
    listener,
    messages,
    tls_client,
    tls_wire,
)
from integration.test_transcripts import written

XCLIENT_LOGIN = "S3cret-XCLIENT-login"
RAW_SECRET = b"S3cret-RAW-line!"


@pytest.fixture
def upstream() -> Iterator[AuthUpstream]:
    upstream = AuthUpstream(users=USERS, tokens=TOKENS)
    yield upstream
    upstream.close()


def test_every_mechanism_is_captured_without_its_secrets(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    capture = {"mode": "always", "bodies": True}
    relay = start_relay(
        upstream.config,
        extra={
            "listeners": [{**listener(pki), "transcripts": capture}],
            "transcripts": {"path": str(folder)},
        },
    )
    sent: list[tuple[str, str, str]] = []  # mechanism, user, secret of each exchange
    for mechanism in MECHANISMS:
        user, secret = CREDENTIALS[mechanism]
        for initial in (False, True):
            with tls_client(relay, pki) as client:
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    authenticate(client, mechanism, user, WRONG[mechanism], initial=initial)
                sent.append((mechanism, user, WRONG[mechanism]))
                assert authenticate(client, mechanism, user, secret, initial=initial)[0] == 235
                sent.append((mechanism, user, secret))
                client.sendmail(user, ["b@example.net"], "Subject: auth\r\n\r\nhello\r\n")
    # Before TLS AUTH is refused by the relay itself; the response lines a
    # pipelining client sent after it arrive as lines of their own.
    user, secret = CREDENTIALS["LOGIN"]
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.send(b"AUTH LOGIN " + b64(user) + CRLF + b64(secret) + CRLF)
        client.expect(538)
        client.expect(500)
        plain = b"AUTH PLAIN " + b64(f"\0{user}\0{secret}")
        client.command(plain + CRLF, 538)
        client.command(b"XCLIENT LOGIN=%s ADDR=192.0.2.1\r\n" % XCLIENT_LOGIN.encode(), 502)
        client.command(b"QUIT\r\n", 221)
    # A response line that is not base64 is refused and cancelled upstream.
    with tls_wire(relay, pki) as client:
        client.command(b"AUTH PLAIN\r\n", 334)
        client.send(RAW_SECRET + CRLF)
        client.reply()
        client.send(b"QUIT\r\n")
        client.read_to_eof()
    sessions = 2 * len(MECHANISMS) + 2
    relay.stop()
    upstream_sessions = upstream.wait_sessions(sessions)
    captured = written(folder)
    assert len(captured) == sessions

    # Each secret, alone and in the SASL messages that carried it, plain and
    # in base64; for CRAM-MD5 the digests for each challenge.
    challenges = cram_challenges(upstream_sessions)
    assert len(challenges) == 4
    needles: dict[bytes, str] = {
        RAW_SECRET: "raw line",
        b64(RAW_SECRET): "raw line, base64",
        XCLIENT_LOGIN.encode(): "XCLIENT LOGIN",
    }
    for mechanism, user, secret in sent:
        needles[secret.encode()] = secret
        needles.update((form, f"{secret}, base64") for form in base64_forms(secret.encode()))
        if mechanism == "CRAM-MD5":
            for challenge in challenges:
                digest = cram_digest(secret, challenge).encode()
                needles[digest] = needles[digest.upper()] = f"{secret}, HMAC-MD5"
                response = b64(f"{user} {digest.decode()}")
                needles[response] = f"{secret}, CRAM-MD5 response"
        else:
            for message in messages(mechanism, user, secret, []):
                if secret.encode() in message:
                    needles[message] = f"{secret}, {mechanism} message"
                    needles[b64(message)] = f"{secret}, {mechanism} message, base64"
    files = {path.name: path.read_bytes() for path in sorted(folder.iterdir())}
    # JSON escapes control characters: look in the decoded text too.
    decoded = {
        name: json.dumps(json.loads(data), ensure_ascii=False) for name, data in files.items()
    }
    found = [
        f"{what} in {name}"
        for needle, what in needles.items()
        for name in files
        if needle in files[name] or needle.decode("latin-1") in decoded[name]
    ]
    assert not found

    # What the transcripts do show: mechanisms, redactions, identities.
    entries = [entry["text"] for content in captured for entry in content["entries"]]
    for mechanism in MECHANISMS:
        user, _ = CREDENTIALS[mechanism]
        assert f"AUTH {mechanism}: authenticated as {user}" in entries
        assert f"AUTH {mechanism}\r\n" in entries
    assert "AUTH PLAIN [redacted]\r\n" in entries
    assert "AUTH LOGIN [redacted]\r\n" in entries
    assert "XCLIENT LOGIN=[redacted] ADDR=192.0.2.1\r\n" in entries
    identities = sorted(str(content["header"]["auth"]) for content in captured)
    users = [user for user, _ in CREDENTIALS.values()]
    assert identities == sorted([*(2 * users), "None", "None"])
    for content in captured:
        for entry in content["entries"]:
            if entry.get("tag") == "auth" and not entry["text"].upper().startswith("AUTH"):
                assert entry["text"] in ("[redacted]\r\n", "*\r\n"), entry
