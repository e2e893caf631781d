"""Tests for ``smtpwarden queue``: every action, --json, exit codes, and safety.

Each test builds a real spool in tmp_path through the Spool API and runs
``cli.main`` on it, as an operator would while the relay runs.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smtpwarden.cli import main
from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool import BodyKind, EntryState, Envelope, NoSuchEntry, RecipientState, Spool

OK = ReplyInfo(code=250, enhanced="2.0.0", text="Ok: queued as X", local=False)
DATA_MESSAGE = b"Subject: hi\r\n\r\n..a stuffed dot\r\nend\r\n.\r\n"
BDAT_MESSAGE = b"Subject: chunked\r\n\r\n.not stuffed\r\n"
UNKNOWN_ID = "20000101T000000.000000-00000000"
BUSY_ERROR = "451 4.3.0 upstream busy \x1b[31m and a long story about why it is busy"


@dataclass(frozen=True)
class Seeded:
    """A spool folder with one entry in each state."""

    folder: Path
    queued: str
    deferred: str
    held: str
    dead: str

    def spool(self) -> Spool:
        return Spool(self.folder)


def envelope(*recipients: bytes, sender: bytes = b"<alice@example.org> SIZE=40") -> Envelope:
    return Envelope(
        mail_from=b"MAIL FROM:" + sender,
        recipients=tuple(b"RCPT TO:" + r for r in recipients),
        body=BodyKind.DATA,
        transaction_id="tx-1",
        dedupe_key="dedupe-1",
        route="main",
    )


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    folder = tmp_path / "spool"
    with Spool(folder) as spool:
        queued = spool.put_sync(envelope(b"<a@example.net>"), [DATA_MESSAGE])
        deferred = spool.put_sync(
            envelope(b"<b@example.net>", b"<c@example.net> NOTIFY=NEVER"), [DATA_MESSAGE]
        )
        spool.mark_delivered(deferred, 0, OK)
        # An attempt that may have delivered: a lost outcome, say.
        spool.defer(deferred, BUSY_ERROR, time.time() + 600, duplicate_risk=True)
        bdat = Envelope(
            mail_from=b"MAIL FROM:<>",
            recipients=(b"RCPT TO:<postmaster@example.net>",),
            body=BodyKind.BDAT,
            transaction_id="tx-3",
            dedupe_key="dedupe-3",
        )
        held = spool.put_sync(bdat, [BDAT_MESSAGE])
        spool.hold(held)
        dead = spool.put_sync(envelope(b"<d@example.net>"), [DATA_MESSAGE])
        spool.to_dead(dead, "too old")
    return Seeded(folder=folder, queued=queued, deferred=deferred, held=held, dead=dead)


def queue(seeded: Seeded, *args: str) -> int:
    return main(["queue", "--spool", str(seeded.folder), *args])


@pytest.fixture
def spool(seeded: Seeded) -> Iterator[Spool]:
    """The seeded spool, opened beside the command as the relay would have it."""
    with seeded.spool() as opened:
        yield opened


# --- list -----------------------------------------------------------------------


def test_list_prints_one_line_per_entry_oldest_first(
    seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(seeded, "list") == 0
    out, err = capsys.readouterr()
    header, *lines = out.splitlines()
    assert header.split() == [
        "ID", "STATE", "AGE", "TRIES", "SIZE", "SENDER", "RCPTS", "NEXT", "DUP", "LAST", "ERROR"
    ]  # fmt: skip
    assert [line.split()[:2] for line in lines] == [
        [seeded.queued, "queued"],
        [seeded.deferred, "deferred"],
        [seeded.held, "held"],
        [seeded.dead, "dead"],
    ]
    queued, deferred, held, dead = (line.split() for line in lines)
    assert re.fullmatch(r"\d+s", queued[2])
    assert queued[3:] == ["0", "40B", "alice@example.org", "1/1", "now", "no"]
    assert deferred[3:8] == ["1", "40B", "alice@example.org", "1/2", "in"]
    assert re.fullmatch(r"(9|10)m", deferred[8])
    assert deferred[9] == "yes"
    assert held[5:] == ["<>", "1/1", "held", "no"]
    assert dead[-4:] == ["never", "no", "too", "old"]
    # The last error is shortened, and the escape character cannot reach the terminal.
    assert lines[1].endswith("  451 4.3.0 upstream busy \\x1b[31m and ...")
    assert "\x1b" not in out
    assert err == ""


@pytest.mark.parametrize("state", [s.value for s in EntryState])
def test_list_state_keeps_only_that_state(
    seeded: Seeded, capsys: pytest.CaptureFixture[str], state: str
) -> None:
    assert queue(seeded, "list", "--state", state) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == [getattr(seeded, state)]


def test_list_json_holds_every_field(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue(seeded, "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed] == [seeded.queued, seeded.deferred, seeded.held, seeded.dead]
    deferred = listed[1]
    assert deferred["state"] == "deferred"
    assert deferred["attempts"] == 1
    assert deferred["last_error"] == BUSY_ERROR
    assert deferred["duplicate_risk"] is True
    assert [e["duplicate_risk"] for e in listed] == [False, True, False, False]
    assert deferred["sender"] == "alice@example.org"
    assert deferred["mail_from"] == "MAIL FROM:<alice@example.org> SIZE=40"
    assert (deferred["pending"], deferred["total"]) == (1, 2)
    assert deferred["recipients"] == [
        {
            "address": "b@example.net",
            "line": "RCPT TO:<b@example.net>",
            "state": "delivered",
            "reply": {"code": 250, "enhanced": "2.0.0", "text": "Ok: queued as X", "local": False},
        },
        {
            "address": "c@example.net",
            "line": "RCPT TO:<c@example.net> NOTIFY=NEVER",
            "state": "pending",
            "reply": None,
        },
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", deferred["next_attempt"])
    assert deferred["body"] == "data"
    assert deferred["size"] == len(DATA_MESSAGE)
    assert listed[2]["sender"] == ""
    assert listed[2]["body"] == "bdat"


def test_list_of_an_empty_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Spool(tmp_path).close()
    assert main(["queue", "--spool", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out == "the spool is empty\n"
    assert main(["queue", "--spool", str(tmp_path), "list", "--state", "held"]) == 0
    assert capsys.readouterr().out == "no held entries\n"
    assert main(["queue", "--spool", str(tmp_path), "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


# --- show -----------------------------------------------------------------------


def test_show_prints_the_whole_envelope(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue(seeded, "show", seeded.deferred) == 0
    out = capsys.readouterr().out
    assert f"id:             {seeded.deferred}\n" in out
    assert "state:          deferred\n" in out
    assert "attempts:       1\n" in out
    assert "last error:     451 4.3.0 upstream busy \\x1b[31m and a long story" in out
    assert "duplicate risk: yes\n" in out
    assert "mail from:      MAIL FROM:<alice@example.org> SIZE=40\n" in out
    assert "recipients:     1 of 2 pending\n" in out
    assert "  delivered  b@example.net\n" in out
    assert "last reply: 250 2.0.0 Ok: queued as X\n" in out
    assert "  pending    c@example.net\n" in out
    assert "RCPT TO:<c@example.net> NOTIFY=NEVER\n" in out
    assert "last reply: no reply yet\n" in out
    assert "route:          main" in out


def test_show_says_whether_an_entry_risks_a_duplicate(
    seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(seeded, "show", seeded.queued) == 0
    out = capsys.readouterr().out
    assert "duplicate risk: no\n" in out
    # The last error is the error alone: the risk has a line of its own.
    assert "last error:     -\n" in out
    assert queue(seeded, "show", seeded.deferred, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["duplicate_risk"] is True
    assert shown["last_error"] == BUSY_ERROR


def test_show_json_is_one_object(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue(seeded, "show", seeded.held, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == seeded.held
    assert shown["state"] == "held"
    assert shown["duplicate_risk"] is False
    assert shown["recipients"][0]["address"] == "postmaster@example.net"


def test_show_message_undoes_dot_stuffing_of_a_data_body(
    seeded: Seeded, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert queue(seeded, "show", seeded.queued, "--message") == 0
    assert capsysbinary.readouterr().out == b"Subject: hi\r\n\r\n.a stuffed dot\r\nend\r\n"


def test_show_message_prints_a_bdat_body_as_stored(
    seeded: Seeded, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert queue(seeded, "show", seeded.held, "--message") == 0
    assert capsysbinary.readouterr().out == BDAT_MESSAGE


def test_show_of_an_unknown_entry_fails(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue(seeded, "show", UNKNOWN_ID) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"smtpwarden queue: {UNKNOWN_ID}: no such entry\n"


# --- changes --------------------------------------------------------------------


def test_retry_makes_an_entry_due_now(
    seeded: Seeded, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    before = time.time()
    assert queue(seeded, "retry", seeded.deferred, seeded.dead) == 0
    assert capsys.readouterr().out == (
        f"{seeded.deferred}: queued, due now\n{seeded.dead}: queued, due now\n"
    )
    for queue_id in (seeded.deferred, seeded.dead):
        entry = spool.get(queue_id)
        assert entry.state is EntryState.QUEUED
        assert before <= entry.next_attempt <= time.time()
    # What was delivered stays delivered.
    assert spool.get(seeded.deferred).recipients[0].state is RecipientState.DELIVERED


def test_retry_all_takes_every_deferred_entry_and_only_those(
    seeded: Seeded, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(seeded, "retry", "--all", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [
        {"id": seeded.deferred, "ok": True, "state": "queued", "error": None}
    ]
    states = {entry.queue_id: entry.state for entry in spool.entries()}
    assert states[seeded.held] is EntryState.HELD
    assert states[seeded.dead] is EntryState.DEAD
    assert queue(seeded, "retry", "--all") == 0
    assert capsys.readouterr().out == "no deferred entries\n"


def test_hold_then_release(
    seeded: Seeded, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(seeded, "hold", seeded.queued, seeded.deferred) == 0
    assert capsys.readouterr().out == f"{seeded.queued}: held\n{seeded.deferred}: held\n"
    assert spool.get(seeded.deferred).state is EntryState.HELD
    assert queue(seeded, "release", seeded.queued, seeded.deferred) == 0
    # An entry that was tried before goes back to waiting for its next attempt.
    assert capsys.readouterr().out == (
        f"{seeded.queued}: released, queued\n{seeded.deferred}: released, deferred\n"
    )


def test_dead_moves_to_dead_letters_with_the_operator_reason(
    seeded: Seeded, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(seeded, "dead", seeded.held) == 0
    assert capsys.readouterr().out == f"{seeded.held}: dead (operator)\n"
    entry = spool.get(seeded.held)
    assert entry.state is EntryState.DEAD
    assert entry.last_error == "operator"


def test_delete_removes_the_entry_and_its_files(
    seeded: Seeded, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(seeded, "delete", seeded.dead, seeded.dead, "--json") == 0
    # A repeated id is handled once.
    assert json.loads(capsys.readouterr().out) == [
        {"id": seeded.dead, "ok": True, "state": "deleted", "error": None}
    ]
    with pytest.raises(NoSuchEntry):
        spool.get(seeded.dead)
    assert not any(name.startswith(seeded.dead) for name in os.listdir(seeded.folder / "queue"))


# --- failures -------------------------------------------------------------------


def test_every_failed_id_is_reported_and_the_others_are_done(
    seeded: Seeded, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [UNKNOWN_ID, "../../etc/passwd", seeded.queued, seeded.held]
    assert queue(seeded, "release", *ids) == 1
    out, err = capsys.readouterr()
    assert out == f"{seeded.held}: released, queued\n"
    assert err.splitlines() == [
        f"smtpwarden queue: {UNKNOWN_ID}: no such entry",
        "smtpwarden queue: ../../etc/passwd: not a queue id",
        f"smtpwarden queue: {seeded.queued}: cannot release an entry that is queued",
    ]
    assert spool.get(seeded.held).state is EntryState.QUEUED


def test_failures_are_in_the_json_too(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue(seeded, "hold", seeded.dead, "--json") == 1
    out, err = capsys.readouterr()
    reason = "cannot hold an entry that is dead"
    assert json.loads(out) == [{"id": seeded.dead, "ok": False, "state": None, "error": reason}]
    assert err == f"smtpwarden queue: {seeded.dead}: {reason}\n"


def test_retry_of_a_held_entry_is_refused(
    seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(seeded, "retry", seeded.held) == 1
    assert "cannot retry an entry that is held" in capsys.readouterr().err


def test_an_entry_under_delivery_is_reported_busy(
    seeded: Seeded, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    # A delivery worker holds its entry's lease for the whole delivery.
    with spool.lease(seeded.queued):
        started = time.monotonic()
        code = queue(seeded, "delete", seeded.queued, seeded.deferred, "--wait", "0.05")
        waited = time.monotonic() - started
    assert code == 1
    out, err = capsys.readouterr()
    assert out == f"{seeded.deferred}: deleted\n"
    assert err == f"smtpwarden queue: {seeded.queued}: busy (a delivery holds it), try again\n"
    assert waited < 5
    assert spool.get(seeded.queued).state is EntryState.QUEUED


def test_the_command_never_runs_crash_cleanup(
    seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a put under way in the relay looks like: recover() would remove both.
    in_progress = seeded.folder / "tmp" / f"{UNKNOWN_ID}.msg"
    in_progress.write_bytes(b"half")
    orphan = seeded.folder / "queue" / f"{UNKNOWN_ID}.msg"
    orphan.write_bytes(b"not yet committed")
    assert queue(seeded, "list") == 0
    assert queue(seeded, "hold", seeded.queued) == 0
    assert in_progress.exists()
    assert orphan.exists()
    assert UNKNOWN_ID not in capsys.readouterr().out


# --- where the spool is ---------------------------------------------------------


def write_config(path: Path, spool_path: Path) -> Path:
    path.write_text(
        "listeners:\n  - host: 127.0.0.1\n    port: 2525\n"
        "upstreams:\n  - kind: sink\n    path: ./mail\n"
        f"spool:\n  path: {json.dumps(str(spool_path))}\n",
        encoding="utf-8",
    )
    return path


def test_config_names_the_spool(
    seeded: Seeded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "smtpwarden.yaml", seeded.folder)
    assert main(["queue", "--config", str(config), "list", "--state", "held"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(seeded.held)
    # The options are accepted after the action too.
    assert main(["queue", "show", seeded.dead, "-c", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "dead"


def test_the_default_spool_is_the_default_configs(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(seeded.folder.parent)  # the default spool.path is ./spool
    assert main(["queue", "list", "--state", "dead"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(seeded.dead)


def test_a_folder_without_a_spool_is_a_usage_error_and_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo"
    assert main(["queue", "--spool", str(missing), "list"]) == 2
    assert "--spool: expected a spool folder" in capsys.readouterr().err
    assert not missing.exists()

    config = write_config(tmp_path / "smtpwarden.yaml", missing)
    assert main(["queue", "--config", str(config), "retry", "--all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{config}: 1 problem\n")
    assert "spool.path: expected a spool folder" in err

    monkeypatch.chdir(tmp_path)
    assert main(["queue", "list"]) == 2
    assert "give --spool FOLDER or --config FILE" in capsys.readouterr().err
    assert not missing.exists()
    assert not (tmp_path / "spool").exists()


def test_a_bad_config_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("spool: [not, a, mapping]\n", encoding="utf-8")
    assert main(["queue", "--config", str(config), "list"]) == 2
    assert capsys.readouterr().err.startswith(f"{config}: ")


def test_a_spool_that_cannot_be_opened_fails_with_1(
    seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = seeded.folder / "spool.lock"
    lock.unlink()
    lock.mkdir()  # opening it for the shared lock now fails
    assert queue(seeded, "list") == 1
    assert capsys.readouterr().err.startswith("smtpwarden: cannot open spool")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "x.yaml", "list", "--spool", "y"], "--config and --spool cannot be combined"),
        (["--spool", "y", "--config", "x.yaml", "list"], "not allowed with argument"),
        (["--spool", "y", "retry"], "give at least one queue id, or --all"),
        (["--spool", "y", "retry", "--all", UNKNOWN_ID], "give queue ids or --all, not both"),
        (["--spool", "y", "show", UNKNOWN_ID, "--message", "--json"], "cannot be combined"),
        (["--spool", "y", "hold"], "the following arguments are required: ID"),
        (["--spool", "y", "hold", UNKNOWN_ID, "--wait", "-1"], "expected seconds >= 0"),
        (["--spool", "y", "list", "--state", "lost"], "invalid choice: 'lost'"),
        (["--spool", "y", "purge"], "invalid choice: 'purge'"),
        (["--spool", "y"], "the following arguments are required: ACTION"),
    ],
    ids=[
        "config-and-spool",
        "config-and-spool-together",
        "retry-nothing",
        "retry-all-and-ids",
        "message-and-json",
        "hold-nothing",
        "negative-wait",
        "bad-state",
        "bad-action",
        "no-action",
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["queue", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: smtpwarden queue")
    assert message in err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["queue", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "smtpwarden queue retry --all" in out
    assert "never runs crash recovery" in out
