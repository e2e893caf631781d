"""Synthetic log records for the report tests, each checked against its schema.

``transaction``, ``session`` and ``delivery`` build one record as a dict,
the way the relay writes it, and validate it with jsonschema against the
packaged JSON Schema before returning it, so the report is always tested
on records the relay could have written.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import itertools
import json
from collections.abc import Sequence
from typing import Any

from jsonschema import Draft202012Validator

Json = dict[str, Any]

_COUNTER = itertools.count(1)
ADVICE = {
    "none": "Nothing to do.",
    "resources": "The server is short of resources or overloaded; retry later.",
    "policy": "The server refused the message by policy.",
    "routing": "The destination could not be resolved or reached.",
    "connection_lost": "The connection to the upstream was lost; check the network.",
    "mailbox_full": "Recipient mailbox is full.",
}
ENHANCED = {2: "2.0.0", 4: "4.3.0", 5: "5.1.1"}


@functools.cache
def validator(name: str) -> Draft202012Validator:
    resource = importlib.resources.files("smtpwarden.observe") / f"schema/{name}.schema.json"
    schema = json.loads(resource.read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def reply(code: int, text: str = "Ok", *, local: bool = False) -> Json:
    return {"code": code, "enhanced": ENHANCED[code // 100], "text": text, "local": local}


def step(command: str, latency_ms: float | None, code: int | None, at_ms: float = 0.0) -> Json:
    return {
        "command": command,
        "at_ms": at_ms,
        "latency_ms": latency_ms,
        "code": code,
        "local": False,
    }


def _peer() -> Json:
    return {"address": "192.0.2.10", "port": 40000}


def _tls() -> Json:
    return {
        "client": "none",
        "upstream": "none",
        "client_subject": None,
        "upstream_subject": None,
        "upstream_verified": None,
    }


def transaction(
    *,
    time: str = "2025-03-01T09:15:02.417Z",
    outcome: str = "delivered",
    upstream: str = "mx1",
    listener: str = "main",
    recipients: Sequence[tuple[str, int]] = (("ops@example.net", 250),),
    final: int | None = 250,
    pattern: str = "none",
    cause: str = "none",
    attempts: int = 1,
    duplicate_risk: bool = False,
    latencies: Sequence[tuple[str, float | None, int | None]] | None = None,
) -> Json:
    """A DATA transaction record; ``latencies`` replaces its timeline steps."""
    number = next(_COUNTER)
    session_id = f"abc123{number:07x}"
    if latencies is None:
        latencies = [("MAIL", 0.4, 250)]
        latencies += [("RCPT", 0.6, code) for _, code in recipients]
        latencies += [("DATA", 0.3, 354), (".", 12.5, final)]
    record: Json = {
        "type": "transaction",
        "time": time,
        "session_id": session_id,
        "transaction_id": f"{session_id}.1",
        "listener": listener,
        "client": _peer(),
        "upstream": {"name": upstream, "address": "198.51.100.25", "port": 25},
        "tls": _tls(),
        "auth": None,
        "helo": "app.example.org",
        "mail_from": {"address": "alerts@example.org", "params": {}, "reply": reply(250)},
        "recipients": [
            {"address": address, "params": {}, "reply": reply(code)} for address, code in recipients
        ],
        "taken_over": [],
        "body": "data",
        "size": 120,
        "body_sha256": hashlib.sha256(b"body").hexdigest(),
        "timeline": [step(command, latency, code) for command, latency, code in latencies],
        "final_reply": None if final is None else reply(final),
        "outcome": outcome,
        "attempts": attempts,
        "duplicate_risk": duplicate_risk,
        "dedupe_key": hashlib.sha256(b"key").hexdigest(),
        "duration_ms": 14.2,
        "diagnosis": {
            "pattern": pattern,
            "cause": cause,
            "retryable": cause != "none",
            "advice": ADVICE[cause],
            "evidence": None,
        },
    }
    validator("transaction").validate(record)
    return record


def session(
    *,
    time: str = "2025-03-01T09:15:02.400Z",
    connect_ms: float = 1.5,
    upstream: str = "mx1",
    listener: str = "main",
) -> Json:
    number = next(_COUNTER)
    record: Json = {
        "type": "session",
        "time": time,
        "session_id": f"abc123{number:07x}",
        "listener": listener,
        "client": _peer(),
        "upstream": {"name": upstream, "address": "198.51.100.25", "port": 25},
        "tls": _tls(),
        "auth": None,
        "helo": "app.example.org",
        "banner": {"code": 220, "enhanced": None, "text": "mx1 ESMTP", "local": False},
        "transactions": 1,
        "timeline": [step("CONNECT", connect_ms, 220), step("QUIT", 0.2, 221, at_ms=9.0)],
        "end": "quit",
        "client_bytes": 300,
        "upstream_bytes": 290,
        "duration_ms": 10.0,
    }
    validator("session").validate(record)
    return record


def delivery(
    *, time: str = "2025-03-01T09:25:04.102Z", outcome: str = "delivered", risk: bool = False
) -> Json:
    state = {"delivered": "delivered", "rejected": "failed", "dead": "pending"}[outcome]
    code = {"delivered": 250, "rejected": 550, "dead": 451}[outcome]
    record: Json = {
        "type": "delivery",
        "time": time,
        "queue_id": "20250301T091502.431207-1a2b3c4d",
        "transaction_id": "abc1230000001.1",
        "dedupe_key": hashlib.sha256(b"key").hexdigest(),
        "route": "main",
        "upstream": {"name": "mx2", "address": "198.51.100.26", "port": 25},
        "mail_from": "alerts@example.org",
        "recipients": [{"address": "ops@example.net", "state": state, "reply": reply(code)}],
        "outcome": outcome,
        "attempts": 2,
        "duplicate_risk": risk,
        "reason": "older than max_age" if outcome == "dead" else None,
        "size": 123,
        "body_sha256": hashlib.sha256(b"body").hexdigest(),
        "queued_s": 601.5,
    }
    validator("delivery").validate(record)
    return record
