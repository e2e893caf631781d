"""The transcript folder, retention, the run-time switch, and the transcript commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from smtpwarden.capturecontrol import CaptureOverride, control_path, read_control, write_control
from smtpwarden.cli import main
from smtpwarden.config import ConfigError, ListenerTranscripts, TranscriptMatch, parse_config
from smtpwarden.net.recording import MAX_ADDRESSES, MAX_RECORDS, Capture, Recording
from smtpwarden.observe.transcript import Direction, Recorder, document
from smtpwarden.observe.transcripts import (
    STALE_TEMP_S,
    TranscriptError,
    TranscriptStore,
    file_name,
    read,
)
from smtpwarden.protocol.records import (
    Address,
    Outcome,
    Peer,
    Tls,
    TransactionRecord,
    Upstream,
)
from smtpwarden.transcriptcli import parse_when, printable, render

C_IN, C_OUT = Direction.CLIENT_IN, Direction.CLIENT_OUT
U_OUT, U_IN, EVENT = Direction.UPSTREAM_OUT, Direction.UPSTREAM_IN, Direction.EVENT


def header(session_id: str, **fields: object) -> dict[str, object]:
    return {
        "id": session_id,
        "listener": "main",
        "client": {"address": "192.0.2.7", "port": 4000},
        "upstream": {"name": "up", "address": "127.0.0.1", "port": 25},
        "started": "2025-03-01T09:15:02.000Z",
        "duration_ms": 12.5,
        "end": "quit",
        "mode": "always",
        "bodies": False,
        "tls": {"client": "none", "upstream": "none"},
        "auth": None,
        "helo": "client.test",
        "senders": ["alice@example.org"],
        "recipients": ["bob@example.net", "carol@example.net"],
        "outcomes": ["delivered"],
        **fields,
    }


def content(session_id: str, **fields: object) -> dict[str, object]:
    recorder = Recorder(start=0.0, max_bytes=100_000, ring=False)
    for at, direction, text in [
        (0.0, EVENT, "connection from 192.0.2.7:4000 to listener main"),
        (0.0001, EVENT, "connecting to upstream up (127.0.0.1:25)"),
        (0.0011, U_IN, "220 up\r\n"),
        (0.0012, C_OUT, "220 up\r\n"),
        (0.002, C_IN, "MAIL FROM:<alice@example.org>\r\n"),
        (0.0021, U_OUT, "MAIL FROM:<alice@example.org>\r\n"),
        (0.0031, U_IN, "250-first\r\n250 Ok \xc3\xa9\x1b[31m\r\n"),
        (0.0032, C_OUT, "250-first\r\n250 Ok \xc3\xa9\x1b[31m\r\n"),
    ]:
        recorder.add(at, direction, text)
    records = [
        {
            "transaction_id": f"{session_id}.1",
            "outcome": "deferred",
            "final_reply": {"code": 451, "text": "later"},
            "diagnosis": {"pattern": "deferred_failure"},
        }
    ]
    return document(header(session_id, **fields), recorder, records, {"type": "session"})


def store_with(folder: Path, *items: tuple[str, float, dict[str, object]]) -> TranscriptStore:
    store = TranscriptStore(folder)
    for session_id, started, fields in items:
        assert store.write(file_name(session_id, started), content(session_id, **fields))
    return store


# -- the folder ------------------------------------------------------------------------


def test_write_find_load(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    store = store_with(folder, ("aa0000001", 1740820502.5, {}))
    (stored,) = store.stored()
    assert stored.path.name == "20250301T091502-aa0000001.json"
    assert stored.transcript_id == "aa0000001"
    assert store.find("aa0000001") == stored.path
    assert store.find(str(stored.path)) == stored.path
    assert store.load("aa0000001")["header"]["id"] == "aa0000001"
    assert oct(folder.stat().st_mode & 0o777) == "0o750"
    assert oct(stored.path.stat().st_mode & 0o777) == "0o640"
    with pytest.raises(TranscriptError, match="bb: no such transcript"):
        store.find("bb")
    assert TranscriptStore(tmp_path / "none").stored() == []


def test_a_write_that_fails_is_logged_and_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert not TranscriptStore(blocked / "sub").write("x.json", {"header": {}})
    assert "transcript x.json not written" in caplog.text


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{", "not a transcript: "),
        (b"[]", "no header"),
        (b'{"header": {}}', "no entries"),
        (b'{"header": {"id": 7}, "entries": []}', "its header lacks id, listener, client, "),
    ],
)
def test_unreadable_transcripts(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "20250301T091502-aa.json"
    path.write_bytes(data)
    with pytest.raises(TranscriptError, match=problem):
        read(path)
    assert list(TranscriptStore(tmp_path).headers()) == []


def test_retention(tmp_path: Path) -> None:
    now = time.time()
    store = TranscriptStore(tmp_path)
    ages = {"old": 5000.0, "a": 400.0, "b": 300.0, "c": 200.0}
    for name, age in ages.items():
        path = tmp_path / f"20250301T000000-{name}.json"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - age, now - age))
    stale = tmp_path / ".20250301T000000-d.json.1234.tmp"
    fresh = tmp_path / ".20250301T000000-e.json.1234.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"")
    os.utime(stale, (now - STALE_TEMP_S - 1, now - STALE_TEMP_S - 1))
    (tmp_path / "capture.json").write_text("{}")
    done = store.enforce(now=now, max_age=3600, max_total_bytes=2500)
    assert (done.removed, done.removed_bytes, done.kept, done.kept_bytes) == (2, 2000, 2, 2000)
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == sorted(
        [
            "capture.json",
            fresh.name,
            "20250301T000000-b.json",
            "20250301T000000-c.json",
        ]
    )
    done = store.enforce(now=now, max_age=0, max_total_bytes=0)
    assert done.removed == 0
    assert (
        TranscriptStore(tmp_path / "none").enforce(now=now, max_age=1, max_total_bytes=1).kept == 0
    )


# -- the relay side of the switch ------------------------------------------------------


def test_the_relay_applies_the_control_file(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    document_ = {
        "hostname": "relay.test",
        "listeners": [
            {"name": "main", "port": 0, "transcripts": {"mode": "failure", "max_bytes": 5000}},
            {"name": "other", "port": 0},
        ],
        "upstreams": [{"host": "mta.test", "port": 25}],
        "transcripts": {"path": str(folder)},
    }
    config = parse_config(document_, source="test")
    override = CaptureOverride(
        mode="match",
        match=TranscriptMatch(sessions=1),
        bodies=True,
        max_bytes=None,
        set_at="first",
    )
    write_control(control_path(folder), {"main": override})
    recording = Recording(config)
    main_capture = recording.listener(config.listeners[0])
    other = recording.listener(config.listeners[1])
    assert main_capture.settings == ListenerTranscripts(
        mode="match", match=TranscriptMatch(sessions=1), bodies=True, max_bytes=5000
    )
    assert other.settings == ListenerTranscripts()
    assert other.begin(0.0) is None
    capture = main_capture.begin(0.0)
    assert capture is not None
    assert capture.recorder.size == 0
    assert main_capture.remaining == 1
    write_control(control_path(folder), {"other": override})
    recording._check_control()
    assert main_capture.settings == config.listeners[0].transcripts
    assert main_capture.remaining is None
    assert other.settings.mode == "match"
    generation = other.generation
    recording._check_control()  # unchanged: nothing applied again
    assert other.generation == generation
    control_path(folder).write_text("{broken")
    recording._check_control()  # a bad file is logged; what is in force stays
    assert other.settings.mode == "match"
    control_path(folder).unlink()
    recording._check_control()
    assert other.settings == ListenerTranscripts()


# -- the commands ----------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_capture_writes_the_control_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ("--dir", str(tmp_path / "t"))
    code, out, _ = run(
        capsys, "transcript", "capture", *where, "--listener", "main", "--mode", "match",
        "--network", "192.0.2.0/24", "--sender", "A@B.example", "--recipient", "@c.example",
        "--sessions", "3", "--bodies",
    )  # fmt: skip
    assert code == 0
    assert out.startswith(
        "listener main: transcripts match, network 192.0.2.0/24, sender a@b.example, "
        "recipient @c.example, 3 sessions, with bodies"
    )
    run(capsys, "transcript", "capture", *where, "--listener", "other", "--mode", "always")
    overrides = read_control(control_path(tmp_path / "t"))
    assert sorted(overrides) == ["main", "other"]
    assert overrides["main"].match.sessions == 3
    assert overrides["main"].bodies
    assert overrides["other"].mode == "always"
    code, out, _ = run(
        capsys, "transcript", "capture", *where, "--listener", "main", "--mode", "config"
    )
    assert (code, out) == (0, "listener main: transcripts as configured\n")
    assert sorted(read_control(control_path(tmp_path / "t"))) == ["other"]


def test_capture_checks_the_listener_against_the_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        "listeners: [{name: main, port: 2525}]\n"
        "upstreams: [{host: mta.test, port: 25}]\n"
        f"transcripts: {{path: {tmp_path / 't'}}}\n"
    )
    code, _, err = run(
        capsys, "transcript", "capture", "-c", str(config), "--listener", "mian", "--mode", "always"
    )
    assert code == 2
    assert '--listener: no listener named "mian" (did you mean "main"?)' in err
    code, _, _ = run(
        capsys, "transcript", "capture", "-c", str(config), "--listener", "main", "--mode", "always"
    )
    assert code == 0
    assert (tmp_path / "t" / "capture.json").is_file()


def test_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "t"
    store_with(
        folder,
        ("aa0000001", 1740820502.0, {}),
        (
            "aa0000002",
            1740820600.0,
            {
                "started": "2025-03-01T09:16:40.000Z",
                "client": {"address": "2001:db8::7", "port": 25},
                "senders": [],
                "recipients": [],
                "outcomes": [],
                "end": "upstream_lost",
            },
        ),
    )
    code, out, _ = run(capsys, "transcript", "list", "--dir", str(folder))
    assert code == 0
    assert out.splitlines() == [
        "ID         STARTED              LISTENER  CLIENT            END            OUTCOMES   "
        "FROM -> TO",
        "aa0000001  2025-03-01 09:15:02  main      192.0.2.7:4000    quit           delivered  "
        "alice@example.org -> bob@example.net (+1)",
        "aa0000002  2025-03-01 09:16:40  main      [2001:db8::7]:25  upstream_lost  -          "
        "- -> -",
    ]
    code, out, _ = run(
        capsys, "transcript", "list", "--dir", str(folder), "--until", "2025-03-01T09:16:00"
    )
    assert [line.split()[0] for line in out.splitlines()] == ["ID", "aa0000001"]
    code, out, _ = run(
        capsys, "transcript", "list", "--dir", str(folder), "--client", "2001:db8::/32"
    )
    assert [line.split()[0] for line in out.splitlines()] == ["ID", "aa0000002"]
    code, out, _ = run(
        capsys, "transcript", "list", "--dir", str(folder), "--sender", "@nowhere.example"
    )
    assert out == "no transcripts\n"
    code, out, _ = run(capsys, "transcript", "show", "--dir", str(folder), "aa0000001")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "transcript aa0000001: listener main, mode always"
    assert "     0.100             ** connecting to upstream up (127.0.0.1:25)" in lines
    assert "     1.100      1.000  U< 220 up" in lines
    assert "     1.200      1.200  S: 220 up" in lines
    assert "     3.100      1.000  U< 250-first" in lines
    assert "                       U< 250 Ok \u00e9\\x1b[31m" in lines
    assert lines[-1] == "transaction aa0000001.1: deferred, 451 later (deferred_failure)"
    code, out, _ = run(capsys, "transcript", "show", "--dir", str(folder), "aa0000001", "--json")
    assert json.loads(out)["header"]["id"] == "aa0000001"


def test_bad_command_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "transcript", "list", "--dir", str(tmp_path / "none"))
    assert code == 2
    assert "--dir: expected a transcripts folder" in err
    code, _, err = run(capsys, "transcript", "list", "--dir", str(tmp_path), "--since", "soon")
    assert code == 2
    assert "--since: expected a time (2025-03-01T09:15:00Z) or an age (30m, 2h), got 'soon'" in err
    code, _, err = run(capsys, "transcript", "list", "--dir", str(tmp_path), "--client", "nowhere")
    assert code == 2
    assert "--client[0]: " in err
    code, _, err = run(capsys, "replay", "x", "--dir", str(tmp_path), "--to", "nowhere")
    assert code == 1
    assert "x: no such transcript" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", 1000.0 - 90),
        ("30m", 1000.0 - 1800),
        ("1.5h", 1000.0 - 5400),
        ("2d", 1000.0 - 172800),
        ("1970-01-01T00:10:00Z", 600.0),
        ("1970-01-01T00:10:00", 600.0),
        ("1970-01-01T01:10:00+01:00", 600.0),
        ("1970-01-02", 86400.0),
    ],
)
def test_parse_when(text: str, expected: float) -> None:
    assert parse_when(text, "--since", 1000.0) == expected


def test_parse_when_refuses() -> None:
    with pytest.raises(ConfigError):
        parse_when("yesterday", "--since", 0.0)


def test_render_legs_and_bodies() -> None:
    recorder = Recorder(start=0.0, max_bytes=100_000, ring=False)
    recorder.add(0.0, EVENT, "connection")
    recorder.add(0.001, C_IN, "DATA\r\n")
    recorder.add(0.002, U_OUT, "DATA\r\n")
    recorder.add(0.0025, U_IN, "354 go\r\n")
    recorder.add(0.003, C_IN, "hello\r\n.\r\n", "end")
    recorder.add(0.004, U_IN, "250 ok\r\n")
    data: dict[str, Any] = document(header("x", bodies=True), recorder, [], {})
    both = render(data)
    assert " C: [content: 10 octets]" in both
    assert " U> DATA" in both
    client = render(data, leg="client", bodies=True)
    assert " U> " not in client
    assert " C: hello" in client
    upstream = render(data, leg="upstream")
    assert " C: " not in upstream
    assert " U> [content: 10 octets]" in upstream
    assert "  1.000  U< 250 ok" in upstream


def test_printable() -> None:
    assert printable("a\x00b\x7f\r\nc\r\n") == ["a\\x00b\\x7f", "c"]
    assert printable("\xc3\xa9\t") == ["\u00e9\t"]
    assert printable("\xff") == ["\ufffd"]


def transaction(outcome: str, sender: str, *recipients: str) -> TransactionRecord:
    peer = Peer(address="192.0.2.7", port=4000)
    return TransactionRecord(
        type="transaction",
        time="2025-03-01T09:15:02.000Z",
        session_id="s",
        transaction_id="s.1",
        listener="main",
        client=peer,
        upstream=Upstream(name="up", address="127.0.0.1", port=25),
        tls=Tls(),
        helo=None,
        mail_from=Address(address=sender, params={}, reply=None),
        recipients=tuple(Address(address=r, params={}, reply=None) for r in recipients),
        body=None,
        size=None,
        body_sha256=None,
        timeline=(),
        final_reply=None,
        outcome=Outcome(outcome),
        attempts=1,
        duration_ms=1.0,
    )


def test_a_capture_keeps_what_its_mode_needs() -> None:
    match = TranscriptMatch(senders=("@match.example",), recipients=("bob@example.net",))
    capture = Capture(ListenerTranscripts(mode="match", match=match), 0.0, 0)
    capture.add([transaction("delivered", "a@match.example", "carol@example.net")])
    assert (capture.sender_matched, capture.recipient_matched, capture.failed) == (
        True,
        False,
        False,
    )
    capture.add([transaction("retried", "x@other.example", "Bob@Example.net")])
    capture.add([transaction("requeued", "x@other.example", "bob@example.net")])
    assert (capture.recipient_matched, capture.failed) == (True, False)
    capture.add([transaction("aborted", "y@other.example")])
    assert capture.failed
    assert list(capture.outcomes) == ["delivered", "retried", "requeued", "aborted"]
    assert list(capture.senders) == ["a@match.example", "x@other.example", "y@other.example"]
    assert capture.transactions == 4
    many = [transaction("delivered", f"s{i}@example.org", f"r{i}@example.net") for i in range(1500)]
    capture.add(many)
    assert capture.transactions == 1504
    assert len(capture.records) == MAX_RECORDS
    assert capture.records[-1].mail_from.address == "s1499@example.org"
    assert len(capture.senders) == len(capture.recipients) == MAX_ADDRESSES
