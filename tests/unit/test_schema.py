"""The JSON Schemas of the log records match what records.py and verdict.py produce.

Records are built by hand (and by the tracker), serialised with orjson as
the transaction log does, and validated. The schemas' field lists and enums
are also pinned to the code, so a field or an end reason added without
updating the schema fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.resources
import importlib.util
import json
from typing import Any, get_args

import orjson
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from smtpwarden.net.verdict import DeliveryOutcome, DeliveryRecord, RecipientResult
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.diagnosis import diagnose
from smtpwarden.protocol.events import Command, Verb
from smtpwarden.protocol.records import (
    Address,
    Outcome,
    Peer,
    ReplyInfo,
    SessionInfo,
    SessionRecord,
    Step,
    Tls,
    TransactionRecord,
    Upstream,
)
from smtpwarden.protocol.replies import parse_reply
from smtpwarden.protocol.tracker import SessionTracker
from smtpwarden.spool.model import RecipientState

Json = dict[str, Any]

SESSION_ID = "3fa9c1000002a"
CLIENT = Peer(address="192.0.2.41", port=51234)
UPSTREAM = Upstream(name="mta", address="198.51.100.25", port=25)
MESSAGE = b"Subject: report\r\n\r\n..dot-stuffed line\r\nbody\r\n"


def load_schema(name: str) -> Json:
    resource = importlib.resources.files("smtpwarden.observe").joinpath(
        f"schema/{name}.schema.json"
    )
    schema: Json = json.loads(resource.read_text(encoding="utf-8"))
    return schema


TRANSACTION_SCHEMA = load_schema("transaction")
SESSION_SCHEMA = load_schema("session")
DELIVERY_SCHEMA = load_schema("delivery")


def validator(schema: Json) -> Draft202012Validator:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def as_json(record: object) -> Json:
    """Serialise exactly as the transaction log does, then parse back.

    A hand-built transaction record gets its diagnosis as the tracker gives
    it one.
    """
    if isinstance(record, TransactionRecord) and record.diagnosis is None:
        record = dataclasses.replace(record, diagnosis=diagnose(record))
    loaded: Json = json.loads(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
    return loaded


def reply(code: int, enhanced: str | None, text: str, *, local: bool = False) -> ReplyInfo:
    return ReplyInfo(code=code, enhanced=enhanced, text=text, local=local)


def step(command: str, at_ms: float, latency_ms: float | None, code: int | None) -> Step:
    return Step(command=command, at_ms=at_ms, latency_ms=latency_ms, code=code, local=False)


def delivered_record() -> TransactionRecord:
    """A DATA transaction with one accepted and one deferred recipient."""
    return TransactionRecord(
        type="transaction",
        time="2025-03-01T09:15:02.417Z",
        session_id=SESSION_ID,
        transaction_id=f"{SESSION_ID}.1",
        listener="submission",
        client=CLIENT,
        upstream=UPSTREAM,
        tls=Tls(),
        helo="app01.example.org",
        mail_from=Address(
            address="alerts@example.org",
            params={"SIZE": "48", "BODY": "8BITMIME", "SMTPUTF8": None},
            reply=reply(250, "2.1.0", "Ok"),
        ),
        recipients=(
            Address(
                address="ops@example.net",
                params={"NOTIFY": "FAILURE,DELAY"},
                reply=reply(250, "2.1.5", "Ok"),
            ),
            Address(
                address="full@example.net",
                params={},
                reply=reply(452, "4.2.2", "Mailbox full"),
            ),
        ),
        body="data",
        size=len(MESSAGE),
        body_sha256=hashlib.sha256(MESSAGE).hexdigest(),
        timeline=(
            step("MAIL", 0.0, 0.412, 250),
            step("RCPT", 0.051, 0.733, 250),
            step("RCPT", 0.063, 0.921, 452),
            step("DATA", 0.07, 1.208, 354),
            step(".", 1.544, 38.07, 250),
        ),
        final_reply=reply(250, "2.0.0", "Ok: queued as 4Tz1qK0m3bz9"),
        outcome=Outcome.DELIVERED,
        attempts=1,
        duration_ms=39.614,
    )


def lost_record() -> TransactionRecord:
    """BDAT LAST sent, then the upstream went away: no final reply."""
    return dataclasses.replace(
        delivered_record(),
        transaction_id=f"{SESSION_ID}.2",
        mail_from=Address(address="", params={}, reply=reply(250, "2.1.0", "Ok")),
        recipients=(
            Address(address="ops@example.net", params={}, reply=reply(250, "2.1.5", "Ok")),
        ),
        body="bdat",
        # No reply to BDAT LAST: the tracker records no size for it.
        size=None,
        body_sha256=None,
        timeline=(
            step("MAIL", 0.0, 0.4, 250),
            step("RCPT", 0.5, 0.6, 250),
            step("BDAT", 1.2, 0.9, 250),
            step("BDAT LAST", 2.3, None, None),
        ),
        final_reply=None,
        outcome=Outcome.UNKNOWN,
        duration_ms=600002.5,
    )


def rejected_record() -> TransactionRecord:
    """The upstream refused MAIL: the transaction ends there."""
    refusal = reply(550, "5.7.1", "Sender address rejected: Access denied")
    return dataclasses.replace(
        delivered_record(),
        helo=None,
        mail_from=Address(address="x@example.org", params={}, reply=refusal),
        recipients=(),
        body=None,
        size=None,
        body_sha256=None,
        timeline=(step("MAIL", 0.0, 12.5, 550),),
        final_reply=refusal,
        outcome=Outcome.REJECTED,
        duration_ms=12.5,
    )


def upstream_failed_record() -> TransactionRecord:
    """The upstream went away after RCPT; smtpwarden answered 421 itself."""
    closing = reply(421, "4.4.2", "relay.example.com Upstream connection failed", local=True)
    return dataclasses.replace(
        delivered_record(),
        recipients=(
            Address(address="ops@example.net", params={}, reply=reply(250, "2.1.5", "Ok")),
        ),
        body=None,
        size=None,
        body_sha256=None,
        timeline=(
            step("MAIL", 0.0, 0.4, 250),
            step("RCPT", 0.5, 0.6, 250),
            Step(command="RCPT", at_ms=0.7, latency_ms=0.0, code=501, local=True),
            step("DATA", 0.9, None, None),
        ),
        final_reply=closing,
        outcome=Outcome.DEFERRED,
        duration_ms=5.0,
    )


def session_record() -> SessionRecord:
    return SessionRecord(
        type="session",
        time="2025-03-01T09:15:02.380Z",
        session_id=SESSION_ID,
        listener="submission",
        client=CLIENT,
        upstream=UPSTREAM,
        tls=Tls(client="none", upstream="none"),
        helo="app01.example.org",
        banner=reply(220, None, "mx1.example.net ESMTP"),
        transactions=2,
        timeline=(
            step("CONNECT", 0.0, 1.9, 220),
            step("EHLO", 2.2, 0.8, 250),
            Step(command="UNKNOWN", at_ms=3.1, latency_ms=0.0, code=500, local=True),
            step("QUIT", 45.0, 0.3, 221),
        ),
        end="quit",
        client_bytes=812,
        upstream_bytes=790,
        duration_ms=45.52,
    )


def delivery_record() -> DeliveryRecord:
    """A spooled message delivered on its second run, one recipient refused for good."""
    return DeliveryRecord(
        type="delivery",
        time="2025-03-01T09:25:04.102Z",
        queue_id="20250301T091502.431207-1a2b3c4d",
        transaction_id=f"{SESSION_ID}.1",
        dedupe_key=hashlib.sha256(b"MAIL FROM:<alerts@example.org>").hexdigest(),
        route="submission",
        upstream=UPSTREAM,
        mail_from="alerts@example.org",
        recipients=(
            RecipientResult(
                address="ops@example.net",
                state="delivered",
                reply=reply(250, "2.0.0", "Ok: queued as 4Tz1qK0m3bz9"),
            ),
            RecipientResult(
                address="gone@example.net",
                state="failed",
                reply=reply(550, "5.1.1", "User unknown"),
            ),
        ),
        outcome="delivered",
        attempts=2,
        duplicate_risk=False,
        reason=None,
        size=len(MESSAGE) + 3,
        body_sha256=hashlib.sha256(MESSAGE + b".\r\n").hexdigest(),
        queued_s=601.671,
    )


def dead_record() -> DeliveryRecord:
    """Too old when its fourth run began: no upstream tried, recipients still pending."""
    return dataclasses.replace(
        delivery_record(),
        mail_from="",
        upstream=None,
        recipients=(
            RecipientResult(address="ops@example.net", state="pending", reply=None),
            RecipientResult(
                address="full@example.net",
                state="pending",
                reply=reply(452, "4.2.2", "Mailbox full"),
            ),
        ),
        outcome="dead",
        attempts=3,
        duplicate_risk=True,
        reason="older than max_age (432000 s); last error: duplicate risk: mta: 451 4.3.0 Busy",
        queued_s=432000.5,
    )


@pytest.mark.parametrize(
    "schema",
    [TRANSACTION_SCHEMA, SESSION_SCHEMA, DELIVERY_SCHEMA],
    ids=["tx", "session", "delivery"],
)
def test_schema_is_valid_draft_2020_12(schema: Json) -> None:
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize(
    "record",
    [delivered_record(), lost_record(), rejected_record(), upstream_failed_record()],
    ids=["delivered", "lost-outcome", "rejected", "upstream-failed"],
)
def test_transaction_records_validate(record: TransactionRecord) -> None:
    validator(TRANSACTION_SCHEMA).validate(as_json(record))


def test_session_record_validates() -> None:
    validator(SESSION_SCHEMA).validate(as_json(session_record()))


def test_session_record_without_banner_validates() -> None:
    record = dataclasses.replace(
        session_record(), helo=None, banner=None, timeline=(), end="upstream_unreachable"
    )
    validator(SESSION_SCHEMA).validate(as_json(record))


@pytest.mark.parametrize(
    ("schema", "record"),
    [(TRANSACTION_SCHEMA, delivered_record()), (SESSION_SCHEMA, session_record())],
    ids=["tx", "session"],
)
def test_unknown_field_is_rejected(schema: Json, record: object) -> None:
    data = as_json(record)
    data["queue_id"] = "4Tz1qK0m3bz9"
    with pytest.raises(ValidationError, match="queue_id"):
        validator(schema).validate(data)


@pytest.mark.parametrize("record", [delivery_record(), dead_record()], ids=["delivered", "dead"])
def test_delivery_records_validate(record: DeliveryRecord) -> None:
    validator(DELIVERY_SCHEMA).validate(as_json(record))


def test_delivery_unknown_field_is_rejected() -> None:
    data = as_json(delivery_record())
    data["session_id"] = SESSION_ID
    with pytest.raises(ValidationError, match="session_id"):
        validator(DELIVERY_SCHEMA).validate(data)


def test_delivery_unknown_recipient_field_is_rejected() -> None:
    data = as_json(delivery_record())
    data["recipients"][0]["params"] = {}
    with pytest.raises(ValidationError, match="params"):
        validator(DELIVERY_SCHEMA).validate(data)


@pytest.mark.parametrize("outcome", ["requeued", "deferred", "success"])
def test_delivery_bad_outcome_is_rejected(outcome: str) -> None:
    data = as_json(delivery_record())
    data["outcome"] = outcome
    with pytest.raises(ValidationError, match=outcome):
        validator(DELIVERY_SCHEMA).validate(data)


def test_unknown_nested_field_is_rejected() -> None:
    data = as_json(delivered_record())
    data["final_reply"]["retryable"] = True
    with pytest.raises(ValidationError, match="retryable"):
        validator(TRANSACTION_SCHEMA).validate(data)


def test_bad_outcome_is_rejected() -> None:
    data = as_json(delivered_record())
    data["outcome"] = "success"
    with pytest.raises(ValidationError, match="success"):
        validator(TRANSACTION_SCHEMA).validate(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("final_reply", "enhanced"), "2.0"),
        (("final_reply", "code"), 199),
        (("final_reply", "local"), "false"),
        (("mail_from", "params", "SIZE"), 48),
        (("body_sha256",), "ABC"),
        (("size",), -1),
        (("time",), "2025-03-01 09:15:02"),
        (("timeline", 0, "command"), "mail"),
        (("body",), "binary"),
        (("attempts",), 0),
    ],
    ids=[
        "short-enhanced",
        "code-range",
        "local-as-string",
        "param-not-string",
        "bad-hash",
        "negative-size",
        "not-rfc3339",
        "lower-case-verb",
        "bad-body",
        "no-attempt",
    ],
)
def test_bad_values_are_rejected(path: tuple[str | int, ...], value: object) -> None:
    data = as_json(delivered_record())
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError):
        validator(TRANSACTION_SCHEMA).validate(data)


def test_missing_field_is_rejected() -> None:
    data = as_json(session_record())
    del data["end"]
    with pytest.raises(ValidationError, match="'end' is a required property"):
        validator(SESSION_SCHEMA).validate(data)


# -- the schemas follow the code ---------------------------------------------


@pytest.mark.parametrize(
    ("schema", "record_class"),
    [
        (TRANSACTION_SCHEMA, TransactionRecord),
        (SESSION_SCHEMA, SessionRecord),
        (DELIVERY_SCHEMA, DeliveryRecord),
    ],
    ids=["tx", "session", "delivery"],
)
def test_schema_fields_are_the_dataclass_fields_in_order(schema: Json, record_class: Any) -> None:
    names = [field.name for field in dataclasses.fields(record_class)]
    assert list(schema["properties"]) == names
    assert schema["required"] == names
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("definition", "record_class"),
    [("ReplyInfo", ReplyInfo), ("Step", Step), ("Peer", Peer), ("Upstream", Upstream)],
)
def test_nested_definitions_follow_the_dataclasses(definition: str, record_class: Any) -> None:
    names = [field.name for field in dataclasses.fields(record_class)]
    for schema in (TRANSACTION_SCHEMA, SESSION_SCHEMA):
        assert list(schema["$defs"][definition]["properties"]) == names


def test_shared_definitions_are_identical() -> None:
    shared = TRANSACTION_SCHEMA["$defs"].keys() & SESSION_SCHEMA["$defs"].keys()
    assert {"ReplyInfo", "Step", "Peer", "Upstream", "Tls"} <= shared
    for name in shared:
        assert TRANSACTION_SCHEMA["$defs"][name] == SESSION_SCHEMA["$defs"][name], name


@pytest.mark.parametrize(
    ("definition", "record_class"),
    [("ReplyInfo", ReplyInfo), ("Upstream", Upstream), ("RecipientResult", RecipientResult)],
)
def test_delivery_definitions_follow_the_dataclasses(definition: str, record_class: Any) -> None:
    names = [field.name for field in dataclasses.fields(record_class)]
    definitions = DELIVERY_SCHEMA["$defs"]
    assert list(definitions[definition]["properties"]) == names
    assert definitions[definition]["required"] == names
    assert definitions[definition]["additionalProperties"] is False


def test_delivery_shares_the_transaction_definitions() -> None:
    shared = DELIVERY_SCHEMA["$defs"].keys() & TRANSACTION_SCHEMA["$defs"].keys()
    assert {"time", "name", "ReplyInfo", "Upstream"} <= shared
    for name in shared:
        assert DELIVERY_SCHEMA["$defs"][name] == TRANSACTION_SCHEMA["$defs"][name], name


def test_delivery_enums_are_the_code_values() -> None:
    outcomes = DELIVERY_SCHEMA["properties"]["outcome"]["enum"]
    assert sorted(outcomes) == sorted(get_args(DeliveryOutcome))
    states = DELIVERY_SCHEMA["$defs"]["RecipientResult"]["properties"]["state"]["enum"]
    assert sorted(states) == sorted(state.value for state in RecipientState)


def test_outcome_enum_is_the_outcome_class() -> None:
    values = TRANSACTION_SCHEMA["properties"]["outcome"]["enum"]
    assert sorted(values) == sorted(outcome.value for outcome in Outcome)


def test_step_commands_are_the_verbs_plus_markers() -> None:
    values = set(TRANSACTION_SCHEMA["$defs"]["Step"]["properties"]["command"]["enum"])
    assert values == {verb.value for verb in Verb} | {"CONNECT", ".", "BDAT LAST", "UNKNOWN"}


SESSION_MODULES = ("session", "ending", "guarded", "secure", "upstreamleg")


def _end_reasons_in_session_module() -> set[str]:
    """String literals passed as the end reason in the session's modules."""
    position = {"_end": 1, "_client_gone": 0, "_upstream_failed": 1, "_refuse_silently": 0}
    reasons: set[str] = set()
    for name in SESSION_MODULES:
        spec = importlib.util.find_spec(f"smtpwarden.net.{name}")
        assert spec is not None
        assert spec.origin is not None
        with open(spec.origin, encoding="utf-8") as source:
            tree = ast.parse(source.read())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            index = position.get(node.func.attr)
            if index is None or len(node.args) <= index:
                continue
            for part in ast.walk(node.args[index]):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    reasons.add(part.value)
    return reasons


def test_end_enum_is_every_reason_the_session_uses() -> None:
    values = set(SESSION_SCHEMA["properties"]["end"]["enum"])
    assert values == _end_reasons_in_session_module()


# -- records the tracker itself produces -------------------------------------


def _command(line: bytes) -> Command:
    event = parse_command(line)
    assert isinstance(event, Command)
    return event


def test_tracker_records_validate() -> None:
    info = SessionInfo(
        session_id=SESSION_ID,
        listener="listener0",
        client=CLIENT,
        upstream=UPSTREAM,
        tls=Tls(),
    )
    tracker = SessionTracker(info=info, now=100.0, epoch_offset=1_740_000_000.0)
    tracker.upstream_reply(parse_reply(b"220 mx1.example.net ESMTP\r\n"), 100.001)
    tracker.forwarded(_command(b"EHLO app01.example.org\r\n"), 100.002)
    tracker.upstream_reply(parse_reply(b"250-mx1.example.net\r\n250 PIPELINING\r\n"), 100.003)
    # Pipelined: MAIL, two RCPT and DATA in one go (RFC 2920).
    tracker.forwarded(_command(b"MAIL FROM:<> SIZE=48\r\n"), 100.010)
    tracker.forwarded(_command(b"RCPT TO:<ops@example.net> NOTIFY=NEVER\r\n"), 100.010)
    tracker.forwarded(_command(b"RCPT TO:<gone@example.net>\r\n"), 100.010)
    tracker.forwarded(_command(b"DATA\r\n"), 100.010)
    tracker.upstream_reply(parse_reply(b"250 2.1.0 Ok\r\n"), 100.012)
    tracker.upstream_reply(parse_reply(b"250 2.1.5 Ok\r\n"), 100.013)
    tracker.upstream_reply(parse_reply(b"550 5.1.1 User unknown\r\n"), 100.014)
    tracker.upstream_reply(parse_reply(b"354 Go ahead\r\n"), 100.015)
    tracker.body(MESSAGE + b".\r\n")
    tracker.end_of_body(100.020)
    tracker.upstream_reply(parse_reply(b"250 2.0.0 Ok: queued as 4Tz1qK0m3bz9\r\n"), 100.050)
    tracker.forwarded(_command(b"QUIT\r\n"), 100.060)
    tracker.upstream_reply(parse_reply(b"221 2.0.0 Bye\r\n"), 100.061)
    session = tracker.close(reason="quit", now=100.062, client_bytes=200, upstream_bytes=190)

    assert len(tracker.records) == 1
    transaction = as_json(tracker.records[0])
    validator(TRANSACTION_SCHEMA).validate(transaction)
    validator(SESSION_SCHEMA).validate(as_json(session))
    assert transaction["outcome"] == "delivered"
    assert transaction["size"] == len(MESSAGE)
    assert transaction["body_sha256"] == hashlib.sha256(MESSAGE).hexdigest()
    assert transaction["mail_from"] == {
        "address": "",
        "params": {"SIZE": "48"},
        "reply": {"code": 250, "enhanced": "2.1.0", "text": "Ok", "local": False},
    }
    assert [r["reply"]["code"] for r in transaction["recipients"]] == [250, 550]


def test_schema_does_not_accept_everything() -> None:
    # A guard against a schema that validates anything (e.g. a broken $ref).
    data = as_json(session_record())
    data["client"] = {"address": "192.0.2.41"}
    with pytest.raises(ValidationError):
        validator(SESSION_SCHEMA).validate(data)
