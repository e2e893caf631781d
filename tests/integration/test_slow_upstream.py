"""An upstream that drips its reply to the final dot, one octet at a time.

Slow but within the deadline, the reply reaches the client under every
policy; slower than the deadline, it is a lost outcome: relayed as 421
under passthrough, replayed on the route's next upstream under retry.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import WAIT_S, StartRelay, WireClient

DRIPPED = b"250 2.0.0 Ok: dripped\r\n"


class DripUpstream:
    """Answers at once, except the final dot: that reply comes octet by octet."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(WAIT_S)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def config(self) -> dict[str, object]:
        return {"kind": "smtp", "host": "127.0.0.1", "port": self.port}

    def _serve(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        with sock:
            sock.settimeout(WAIT_S)
            sock.sendall(b"220 drip.test ESMTP\r\n")
            pending = b""
            try:
                while True:
                    while b"\r\n" not in pending:
                        chunk = sock.recv(4096)
                        if not chunk:
                            return
                        pending += chunk
                    line, _, pending = pending.partition(b"\r\n")
                    verb = line.split(b" ")[0].upper()
                    if verb == b"DATA":
                        sock.sendall(b"354 go ahead\r\n")
                        while not pending.endswith(b"\r\n.\r\n"):
                            pending += sock.recv(4096)
                        pending = b""
                        for octet in DRIPPED:
                            time.sleep(self.delay_s)  # the fault being injected
                            sock.sendall(bytes([octet]))
                    elif verb == b"QUIT":
                        sock.sendall(b"221 bye\r\n")
                        return
                    else:
                        sock.sendall(b"250 ok\r\n")
            except OSError:
                return

    def close(self) -> None:
        self._listener.close()
        self._thread.join(WAIT_S * 2)


@pytest.mark.parametrize("policy", ["passthrough", "retry", "requeue"])
def test_a_slow_reply_within_the_deadline_reaches_the_client(
    start_relay: StartRelay,
    make_raw_upstream: Callable[..., RawUpstream],
    policy: str,
    tmp_path: object,
) -> None:
    drip = DripUpstream(delay_s=0.02)
    b = make_raw_upstream()
    try:
        extra = {
            "upstreams": [{"name": "a", **drip.config}, {"name": "b", **b.config}],
            "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
            "routes": [{"name": "main", "policy": policy, "upstreams": ["a", "b"]}],
            "spool": {"path": f"{tmp_path}/spool"},
        }
        relay = start_relay(drip.config, extra=extra)
        with WireClient(relay.address()) as client:
            client.open_data()
            client.send(b"Subject: slow\r\n\r\nbody\r\n.\r\n")
            assert client.reply() == (250, DRIPPED)
        (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
        assert (record["outcome"], record["attempts"]) == ("delivered", 1)
    finally:
        drip.close()


@pytest.mark.parametrize(
    ("policy", "code", "outcome"),
    [("passthrough", 421, "unknown"), ("retry", 250, "retried")],
)
def test_a_reply_slower_than_the_deadline_is_a_lost_outcome(
    start_relay: StartRelay,
    make_raw_upstream: Callable[..., RawUpstream],
    policy: str,
    code: int,
    outcome: str,
) -> None:
    drip = DripUpstream(delay_s=0.1)  # about 2.3 s for the whole reply
    b = make_raw_upstream()
    try:
        extra = {
            "upstreams": [{"name": "a", **drip.config}, {"name": "b", **b.config}],
            "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
            "routes": [{"name": "main", "policy": policy, "upstreams": ["a", "b"]}],
        }
        relay = start_relay(drip.config, extra=extra, timeouts={"data_end": 0.5})
        with WireClient(relay.address()) as client:
            client.open_data()
            client.send(b"Subject: slow\r\n\r\nbody\r\n.\r\n")
            assert client.reply()[0] == code
        (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
        assert record["outcome"] == outcome
    finally:
        drip.close()
