"""Volume: Postfix's smtp-source pushes 10,000 messages over 20 sessions.

Everything must arrive: smtp-source ends without error, smtp-sink counts
10,000 messages, and the log holds 10,000 "delivered" transaction records,
one per message, in 20 sessions.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable

import pytest

from integration.external_tools import SmtpSink
from integration.relay_harness import StartRelay

MESSAGES = 10_000
SESSIONS = 20
RUN_TIMEOUT_S = 240.0


@pytest.mark.postfix
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_smtp_source_ten_thousand_messages(
    start_relay: StartRelay, make_smtp_sink: Callable[..., SmtpSink], smtp_source: str
) -> None:
    sink = make_smtp_sink()
    relay = start_relay(sink.config)
    host, port = relay.address()
    started = time.monotonic()
    result = subprocess.run(
        [smtp_source, "-s", str(SESSIONS), "-m", str(MESSAGES), "-d", f"{host}:{port}"],
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert result.stderr == b"", result.stderr.decode("utf-8", "replace")

    # The readiness probe is one more session for smtp-sink.
    sink.wait_counters(sessions=SESSIONS + 1, messages=MESSAGES)
    assert sink.counters()[2] == MESSAGES
    relay.stop()
    records = relay.records()
    transactions = [record for record in records if record["type"] == "transaction"]
    assert len(transactions) == MESSAGES
    assert Counter(record["outcome"] for record in transactions) == {"delivered": MESSAGES}
    sessions = [record for record in records if record["type"] == "session"]
    assert len(sessions) == SESSIONS
    assert sum(session["transactions"] for session in sessions) == MESSAGES
    assert {session["end"] for session in sessions} == {"quit"}
    print(f"{MESSAGES} messages in {elapsed:.1f} s")
