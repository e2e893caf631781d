"""Fixtures of the integration suite: relays, upstreams and external peers.

Every relay test runs once per event loop (``loop_kind``). Relays started
with ``start_relay`` are stopped after the test, and their whole log is then
checked: every record against its JSON Schema, one record per transaction
and per session.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from integration.external_tools import SmtpSink, require_tool
from integration.pki import Pki, make_pki
from integration.postfix_instance import PostfixInstance, private_folder, require_postfix
from integration.recording_upstreams import AiosmtpdUpstream, RawUpstream
from integration.relay_harness import (
    STOP_TIMEOUT_S,
    RunningRelay,
    StartRelay,
    check_log_invariants,
    relay_config,
)

LOOP_KINDS = ("asyncio", "uvloop")


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def start_relay(loop_kind: str, tmp_path: Path) -> Iterator[StartRelay]:
    """Start relays in front of an upstream; each is stopped and its log checked."""
    started: list[RunningRelay] = []

    def start(
        upstream: Mapping[str, object],
        *,
        limits: Mapping[str, object] | None = None,
        timeouts: Mapping[str, float] | None = None,
        shutdown: Mapping[str, float] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> RunningRelay:
        log_path = tmp_path / f"transactions-{len(started)}.jsonl"
        document = relay_config(
            loop_kind=loop_kind,
            upstream=upstream,
            log_path=log_path,
            limits=limits,
            timeouts=timeouts,
            shutdown=shutdown,
            extra=extra,
        )
        relay = RunningRelay(document, log_path)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        if relay.is_alive and not relay.stopping:
            # The test's clients are gone; let the relay see it before stopping.
            relay.wait_idle()
            relay.stop()
        elif relay.is_alive:
            relay.join(STOP_TIMEOUT_S)
    for relay in started:
        check_log_invariants(relay.records())


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def make_raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(**kwargs: object) -> RawUpstream:
        upstream = RawUpstream(**kwargs)  # type: ignore[arg-type]
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def aiosmtpd_upstream() -> Iterator[AiosmtpdUpstream]:
    upstream = AiosmtpdUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def make_smtp_sink() -> Iterator[Callable[..., SmtpSink]]:
    made: list[SmtpSink] = []

    def make(*, options: tuple[str, ...] = (), dump: bool = False) -> SmtpSink:
        sink = SmtpSink(options=options, dump=dump)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


@pytest.fixture
def swaks() -> str:
    return require_tool("swaks")


@pytest.fixture
def smtp_source() -> str:
    return require_tool("smtp-source")


@pytest.fixture
def make_postfix_upstream(tmp_path: Path) -> Iterator[Callable[..., PostfixInstance]]:
    """Start private Postfix instances (keyword arguments of ``PostfixInstance``).

    After the test each is stopped, whatever happened, and its folder removed;
    its mail log is kept in ``tmp_path`` to look at after a failure.
    """
    with contextlib.ExitStack() as cleanup:

        def make(**kwargs: object) -> PostfixInstance:
            require_postfix()
            folder = private_folder()
            cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
            instance = PostfixInstance(folder, **kwargs)  # type: ignore[arg-type]
            cleanup.callback(instance.save_maillog, tmp_path / f"{folder.name}.maillog")
            cleanup.callback(instance.stop)
            instance.start()
            return instance

        yield make


@pytest.fixture
def postfix_upstream(
    aiosmtpd_upstream: AiosmtpdUpstream,
    make_postfix_upstream: Callable[..., PostfixInstance],
) -> PostfixInstance:
    """A private Postfix that hands every message it accepts to ``aiosmtpd_upstream``.

    The recorder comes first among the arguments so that it is set up first
    and closed last, after Postfix has stopped.
    """
    return make_postfix_upstream(relayhost=("127.0.0.1", aiosmtpd_upstream.port))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA and the relay's certificate, shared by one test module."""
    return make_pki(tmp_path_factory.mktemp("pki"))
