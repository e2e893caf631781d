"""Transcript capture by a running relay: each mode, the run-time switch,
list and show on real captures, retention, and replay.

The relay writes a transcript through its executor when a session ends;
its thread joins that executor when it stops, so the tests stop the relay
before they look at what was written, or poll while it runs.
"""

from __future__ import annotations

import json
import os
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import (
    LISTENER,
    POLL_S,
    UPSTREAM,
    WAIT_S,
    RunningRelay,
    StartRelay,
    WireClient,
)
from integration.tls_upstreams import ScriptedTlsUpstream, server_side
from smtpwarden.cli import main
from smtpwarden.observe.transcripts import TranscriptStore

MESSAGE = "Subject: transcript\r\n\r\nfirst line\r\n.a line that starts with a dot\r\n"
REFUSED = b"550 5.1.1 No such user\r\n"


def capture_relay(
    start_relay: StartRelay,
    upstream: RawUpstream,
    folder: Path,
    capture: object,
    **transcripts: object,
) -> RunningRelay:
    listener = {
        "name": LISTENER,
        "host": "127.0.0.1",
        "port": 0,
        "upstream": UPSTREAM,
        "transcripts": capture,
    }
    return start_relay(
        upstream.config,
        extra={"listeners": [listener], "transcripts": {"path": str(folder), **transcripts}},
    )


def written(folder: Path) -> list[dict[str, Any]]:
    """Every transcript in ``folder``, oldest first."""
    store = TranscriptStore(folder)
    return [store.load(stored.transcript_id) for stored in store.stored()]


def wait_written(folder: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while len(found := written(folder)) < count:
        assert time.monotonic() < deadline, f"{len(found)} transcripts, expected {count}"
        time.sleep(POLL_S)
    return found


def send(relay: RunningRelay, sender: str = "alice@example.org", *recipients: str) -> None:
    with smtplib.SMTP(*relay.address(), timeout=WAIT_S) as client:
        client.sendmail(sender, list(recipients or ["bob@example.net"]), MESSAGE)


def refused(relay: RunningRelay, sender: str = "alice@example.org") -> None:
    """A transaction whose only recipient the upstream refuses: it ends aborted."""
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"MAIL FROM:<%s>\r\n" % sender.encode(), 250)
        client.command(b"RCPT TO:<nobody@example.net>\r\n", 550)
        client.command(b"RSET\r\n", 250)
        client.command(b"QUIT\r\n", 221)


def texts(content: dict[str, Any], direction: str) -> list[str]:
    return [entry["text"] for entry in content["entries"] if entry["dir"] == direction]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def upstream(make_raw_upstream: Any) -> RawUpstream:
    upstream: RawUpstream = make_raw_upstream(replies={"RCPT <nobody@example.net>": REFUSED})
    return upstream


# -- modes -------------------------------------------------------------------------------


def test_mode_off_writes_nothing(
    start_relay: StartRelay, upstream: RawUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, "off")
    send(relay)
    refused(relay)
    relay.stop()
    assert not folder.exists()


def test_mode_always_writes_every_session_with_both_legs(
    start_relay: StartRelay, upstream: RawUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, {"mode": "always"})
    send(relay, "alice@example.org", "bob@example.net", "carol@example.net")
    refused(relay)
    transactions = relay.records("transaction")
    relay.stop()
    first, second = written(folder)
    header = first["header"]
    assert header["mode"] == "always"
    assert header["senders"] == ["alice@example.org"]
    assert header["recipients"] == ["bob@example.net", "carol@example.net"]
    assert header["outcomes"] == ["delivered"]
    assert header["end"] == "quit"
    assert header["truncated"] is None
    assert second["header"]["outcomes"] == ["aborted"]
    # Both legs, both directions, each command once per leg.
    client_in = texts(first, "client>relay")
    upstream_out = texts(first, "relay>upstream")
    assert "mail FROM:<alice@example.org> size=" in "".join(client_in)  # smtplib's case
    assert [line for line in client_in if line.startswith("rcpt")] == [
        line for line in upstream_out if line.startswith("rcpt")
    ]
    assert texts(first, "upstream>relay")[0].startswith("220 upstream.test")
    assert texts(first, "relay>client")[0].startswith("220 upstream.test")
    assert any("250 2.0.0 Ok: queued" in text for text in texts(first, "relay>client"))
    assert [entry["at_ms"] for entry in first["entries"]] == sorted(
        entry["at_ms"] for entry in first["entries"]
    )
    # Without bodies the message is its size and hash, as the record counts them.
    (record,) = first["transactions"]
    assert record == transactions[0]
    (message,) = [entry for entry in first["entries"] if entry.get("tag") == "end"]
    assert message["text"] == f"[message: {record['size']} octets, sha256 {record['body_sha256']}]"
    assert "first line" not in json.dumps(first)
    assert first["session"]["session_id"] == header["id"]
    events = texts(first, "event")
    assert events[0].startswith("connection from 127.0.0.1:")
    assert any(event.startswith("relaying to upstream up") for event in events)
    assert events[-1] == "session end: quit"


def test_mode_always_keeps_bodies_when_asked(
    start_relay: StartRelay, upstream: RawUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, {"mode": "always", "bodies": True})
    send(relay)
    relay.stop()
    (content,) = written(folder)
    assert content["header"]["bodies"] is True
    body = "".join(
        entry["text"] for entry in content["entries"] if entry.get("tag") in ("data", "end")
    )
    (received,) = upstream.wait_all_ended()
    assert body.encode("latin-1") == received.data[0]
    assert body.endswith("\r\n..a line that starts with a dot\r\n.\r\n")


def test_mode_failure_writes_only_failing_sessions(
    start_relay: StartRelay, upstream: RawUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, "failure")
    send(relay)
    refused(relay, "failing@example.org")
    send(relay)
    relay.stop()
    (content,) = written(folder)
    assert content["header"]["mode"] == "failure"
    assert content["header"]["senders"] == ["failing@example.org"]
    assert content["header"]["outcomes"] == ["aborted"]
    assert any(text.startswith("550 5.1.1") for text in texts(content, "upstream>relay"))


def test_mode_failure_keeps_the_end_of_a_long_session(
    start_relay: StartRelay, upstream: RawUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, {"mode": "failure", "max_bytes": 4096})
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        for _ in range(60):
            client.command(b"NOOP\r\n", 250)
        client.command(b"MAIL FROM:<late@example.org>\r\n", 250)
        client.command(b"RCPT TO:<nobody@example.net>\r\n", 550)
        client.command(b"QUIT\r\n", 221)
    relay.stop()
    (content,) = written(folder)
    cut = content["header"]["truncated"]
    assert cut["kept"] == "end"
    assert cut["entries"] > 0
    assert content["entries"][0]["dir"] == "event"
    assert "dropped: past max_bytes 4096" in content["entries"][0]["text"]
    assert not any(text.startswith("EHLO") for text in texts(content, "client>relay"))
    assert "RCPT TO:<nobody@example.net>\r\n" in texts(content, "client>relay")
    assert texts(content, "event")[-1] == "session end: quit"
    kept = sum(len(entry["text"]) + 48 for entry in content["entries"][1:])
    assert kept <= 4096


def test_mode_always_summarises_past_max_bytes(
    start_relay: StartRelay, upstream: RawUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, {"mode": "always", "max_bytes": 4096})
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        for _ in range(60):
            client.command(b"NOOP\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    relay.stop()
    (content,) = written(folder)
    assert content["header"]["truncated"]["kept"] == "start"
    assert "EHLO client.test\r\n" in texts(content, "client>relay")
    assert "left out: past max_bytes 4096" in content["entries"][-1]["text"]


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        (
            {"senders": ["@match.example"]},
            ["one@match.example", "two@match.example", "three@match.example"],
        ),
        ({"recipients": ["wanted@example.net"]}, ["other@example.org", "two@match.example"]),
        ({"networks": ["127.0.0.0/8"], "sessions": 1}, ["other@example.org"]),
        ({"networks": ["192.0.2.0/24"]}, []),
        (
            {"senders": ["ONE@match.example", "@match.example"], "sessions": 2},
            ["one@match.example", "two@match.example"],
        ),
    ],
    ids=["sender-domain", "recipient", "network-one-session", "other-network", "first-two"],
)
def test_mode_match(
    start_relay: StartRelay,
    upstream: RawUpstream,
    tmp_path: Path,
    match: dict[str, object],
    expected: list[str],
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, {"mode": "match", "match": match})
    send(relay, "other@example.org", "wanted@example.net")
    send(relay, "one@match.example", "bob@example.net")
    send(relay, "two@match.example", "wanted@example.net")
    send(relay, "three@match.example", "bob@example.net")
    relay.stop()
    found = written(folder) if folder.exists() else []
    assert [content["header"]["senders"][0] for content in found] == expected


# -- the run-time switch -----------------------------------------------------------


def wait_mode(relay: RunningRelay, mode: str) -> None:
    assert relay.relay is not None
    capture = relay.relay.recording.listeners[LISTENER]
    deadline = time.monotonic() + WAIT_S
    while relay.call(lambda: capture.settings.mode) != mode:
        assert time.monotonic() < deadline, f"the relay did not switch to {mode}"
        time.sleep(POLL_S)


def test_capture_switches_a_running_relay(
    start_relay: StartRelay,
    upstream: RawUpstream,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, "off")
    send(relay, "before@example.org")
    where = ("--dir", str(folder))
    code, out, _ = run_cli(
        capsys, "transcript", "capture", *where, "--listener", LISTENER, "--mode", "always"
    )
    assert code == 0
    assert "listener main: transcripts always" in out
    assert (folder / "capture.json").is_file()
    wait_mode(relay, "always")
    send(relay, "always@example.org")
    assert [c["header"]["senders"] for c in wait_written(folder, 1)] == [["always@example.org"]]
    argv = ["--listener", LISTENER, "--mode", "match", "--sender", "@match.example"]
    code, out, _ = run_cli(capsys, "transcript", "capture", *where, *argv, "--sessions", "1")
    assert code == 0
    assert "match, sender @match.example, 1 sessions" in out
    wait_mode(relay, "match")
    send(relay, "other@example.org")
    send(relay, "first@match.example")
    send(relay, "second@match.example")
    code, _, _ = run_cli(
        capsys, "transcript", "capture", *where, "--listener", LISTENER, "--mode", "config"
    )
    assert code == 0
    assert not (folder / "capture.json").exists()
    wait_mode(relay, "off")
    send(relay, "after@example.org")
    relay.stop()
    senders = [content["header"]["senders"] for content in written(folder)]
    assert senders == [["always@example.org"], ["first@match.example"]]


def test_capture_refuses_what_does_not_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ("--dir", str(tmp_path))
    code, _, err = run_cli(
        capsys, "transcript", "capture", *where, "--listener", "x", "--mode", "always",
        "--sender", "a@b.example",
    )  # fmt: skip
    assert code == 2
    assert "go with --mode match" in err
    code, _, err = run_cli(
        capsys, "transcript", "capture", *where, "--listener", "x", "--mode", "match",
        "--network", "10.0.0.1/8", "--sender", "nobody",
    )  # fmt: skip
    assert code == 2
    assert "--network[0]: " in err
    assert "--sender[0]: expected an address" in err
    assert not (tmp_path / "capture.json").exists()


# -- list and show -----------------------------------------------------------------


def test_list_and_show_real_captures(
    start_relay: StartRelay,
    upstream: RawUpstream,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, "always")
    send(relay, "alice@example.org", "bob@example.net")
    refused(relay, "mallory@example.org")
    relay.stop()
    first, second = (content["header"]["id"] for content in written(folder))
    where = ("--dir", str(folder))
    code, out, _ = run_cli(capsys, "transcript", "list", *where)
    assert code == 0
    lines = out.splitlines()
    heading = ["ID", "STARTED", "LISTENER", "CLIENT", "END", "OUTCOMES", "FROM", "->", "TO"]
    assert lines[0].split() == heading
    assert lines[1].startswith(first)
    assert "delivered  alice@example.org -> bob@example.net" in lines[1]
    assert lines[2].startswith(second)
    for argv, ids in [
        (["--sender", "@example.org"], [first, second]),
        (["--sender", "mallory@EXAMPLE.org"], [second]),
        (["--recipient", "bob@example.net"], [first]),
        (["--outcome", "aborted"], [second]),
        (["--outcome", "quit"], [first, second]),
        (["--client", "127.0.0.0/8"], [first, second]),
        (["--client", "192.0.2.1"], []),
        (["--since", "1h"], [first, second]),
        (["--until", "1h"], []),
        (["--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01"], [first, second]),
    ]:
        code, out, _ = run_cli(capsys, "transcript", "list", *where, "--json", *argv)
        assert code == 0
        assert [header["id"] for header in json.loads(out)] == ids, argv
    code, out, _ = run_cli(capsys, "transcript", "show", *where, first)
    assert code == 0
    assert f"transcript {first}: listener main, mode always" in out
    dialogue = out.splitlines()
    mail = [line.split(None, 1) for line in dialogue if "FROM:<alice@example.org>" in line]
    assert [parts[1].split()[0] for parts in mail] == ["C:", "U>"]
    replies = [line.split() for line in dialogue if "250 2.1.0 Ok" in line]
    assert [parts[2] for parts in replies] == ["U<", "S:"]
    assert all(float(parts[1]) >= 0 for parts in replies)  # the latency column
    assert f"transaction {first}.1: delivered, 250 Ok: queued" in out
    code, out, _ = run_cli(capsys, "transcript", "show", *where, first, "--leg", "client")
    assert " U> " not in out
    assert " U< " not in out
    assert " C: mail FROM" in out
    code, out, err = run_cli(capsys, "transcript", "show", *where, "nonesuch")
    assert code == 1
    assert "nonesuch: no such transcript" in err


# -- retention -----------------------------------------------------------------------


def fake_transcript(folder: Path, session_id: str, size: int, age_s: float) -> Path:
    started = time.time() - age_s
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    path = folder / f"{stamp}-{session_id}.json"
    header = {"id": session_id, "filler": "x" * size}
    path.write_text(json.dumps({"header": header, "entries": []}))
    os.utime(path, (started, started))
    return path


def test_retention_by_age_and_total_size(
    start_relay: StartRelay, upstream: RawUpstream, tmp_path: Path
) -> None:
    folder = tmp_path / "transcripts"
    folder.mkdir()
    old = fake_transcript(folder, "aa00000000001", 100, age_s=7200)
    mid = [fake_transcript(folder, f"bb0000000000{i}", 1000, age_s=600 - i) for i in range(6)]
    other = folder / "notes.txt"
    other.write_text("not a transcript")
    relay = capture_relay(start_relay, upstream, folder, "off", max_age=3600, max_total_bytes=3500)
    deadline = time.monotonic() + WAIT_S
    while old.exists() or mid[2].exists():
        assert time.monotonic() < deadline, sorted(path.name for path in folder.iterdir())
        time.sleep(POLL_S)
    relay.stop()
    left = sorted(path.name for path in folder.iterdir())
    assert left == sorted(["notes.txt", *(path.name for path in mid[3:])])
    assert sum(path.stat().st_size for path in mid[3:]) <= 3500


# -- replay --------------------------------------------------------------------------


def replay(capsys: pytest.CaptureFixture[str], folder: Path, ident: str, port: int) -> str:
    code, out, err = run_cli(
        capsys, "replay", ident, "--dir", str(folder), "--to", f"127.0.0.1:{port}"
    )
    assert code == 0, err
    return out


def test_replay_reproduces_the_upstream_bytes(
    start_relay: StartRelay,
    upstream: RawUpstream,
    make_raw_upstream: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, {"mode": "always", "bodies": True})
    with smtplib.SMTP(*relay.address(), timeout=WAIT_S) as client:
        client.sendmail("alice@example.org", ["bob@example.net", "nobody@example.net"], MESSAGE)
        client.sendmail("carol@example.org", ["dave@example.net"], "Subject: two\r\n\r\n.\r\n")
    with WireClient(relay.address()) as client:  # BDAT, pipelined
        client.expect(220)
        client.command(b"EHLO chunks.test\r\n", 250)
        client.send(b"MAIL FROM:<e@example.org>\r\nRCPT TO:<f@example.net>\r\n")
        client.expect(250)
        client.expect(250)
        client.command(b"BDAT 12\r\nSubject: x\r\n", 250)
        client.command(b"BDAT 10 LAST\r\n\r\n.\r\nend\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    relay.stop()
    originals = upstream.wait_all_ended(2)
    for content, original in zip(written(folder), originals, strict=True):
        target = make_raw_upstream(replies={"RCPT <nobody@example.net>": REFUSED})
        out = replay(capsys, folder, content["header"]["id"], target.port)
        (replayed,) = target.wait_all_ended()
        assert replayed.commands == original.commands
        assert replayed.data == original.data
        assert replayed.bdat_chunks == original.bdat_chunks
        assert replayed.quit
        assert "** replay done" in out
        assert "the original upstream answered" not in out
    assert original.bdat_chunks == [b"Subject: x\r\n", b"\r\n.\r\nend\r\n"]


def test_replay_shows_where_the_target_differs(
    start_relay: StartRelay,
    upstream: RawUpstream,
    make_raw_upstream: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, {"mode": "always", "bodies": True})
    send(relay)
    relay.stop()
    (content,) = written(folder)
    target = make_raw_upstream(replies={".": b"451 4.3.0 Try again later\r\n"})
    out = replay(capsys, folder, content["header"]["id"], target.port)
    assert "S: 451 4.3.0 Try again later" in out
    assert "(the original upstream answered: 250 2.0.0 Ok: queued)" in out


def test_replay_needs_bodies(
    start_relay: StartRelay,
    upstream: RawUpstream,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "transcripts"
    relay = capture_relay(start_relay, upstream, folder, "always")
    send(relay)
    relay.stop()
    (content,) = written(folder)
    code, _, err = run_cli(
        capsys, "replay", content["header"]["id"], "--dir", str(folder), "--to", "127.0.0.1:9"
    )
    assert code == 1
    assert "captured without bodies" in err


def test_replay_with_starttls_of_a_session_relayed_over_tls(
    start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    original = ScriptedTlsUpstream(server_side(leaf))
    target = ScriptedTlsUpstream(server_side(leaf))
    try:
        folder = tmp_path / "transcripts"
        upstream = {**original_config(original), "tls": {"mode": "starttls", "verify": False}}
        listener = {
            "name": LISTENER,
            "host": "127.0.0.1",
            "port": 0,
            "upstream": UPSTREAM,
            "transcripts": {"mode": "always", "bodies": True},
        }
        relay = start_relay(
            upstream, extra={"listeners": [listener], "transcripts": {"path": str(folder)}}
        )
        send(relay)
        relay.stop()
        (content,) = written(folder)
        own = [e["text"] for e in content["entries"] if e.get("tag") == "own"]
        assert own == ["EHLO relay.test\r\n", "STARTTLS\r\n", "EHLO relay.test\r\n"]
        tls = [text for text in texts(content, "event") if text.startswith("TLS with the upstream")]
        assert tls == [f"TLS with the upstream: {content['header']['tls']['upstream']}"
                       " (certificate not verified)"]  # fmt: skip
        code, out, err = run_cli(
            capsys, "replay", content["header"]["id"], "--dir", str(folder),
            "--to", f"127.0.0.1:{target.port}", "--starttls", "--insecure",
        )  # fmt: skip
        assert code == 0, err
        assert "** TLS: TLSv1" in out
        (before,) = original.wait_all_ended()
        (after,) = target.wait_all_ended()
        relayed = [line for line, secure in zip(before.commands, before.secure, strict=True)
                   if secure and line != b"EHLO relay.test\r\n"]  # fmt: skip
        replayed = [line for line, secure in zip(after.commands, after.secure, strict=True)
                    if secure]  # fmt: skip
        assert replayed == relayed
        assert after.data == before.data
        assert after.plaintext()[-1] == b"STARTTLS\r\n"
    finally:
        original.close()
        target.close()


def original_config(upstream: ScriptedTlsUpstream) -> dict[str, object]:
    return {"kind": "smtp", "host": "127.0.0.1", "port": upstream.port}
