"""What the sessions of one listener share.

Built per listener by the relay, at start and on each reload (SIGHUP): a
session keeps the one it started with to its end. Sessions read it and
never change it. Whether the relay is shutting down (``draining``) is one
``Draining`` shared by every context the relay ever built, so that a
session made from a context a reload has since replaced learns it too.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smtpwarden.config import Config, ListenerConfig
from smtpwarden.net.admission import Admission
from smtpwarden.net.recording import ListenerCapture
from smtpwarden.net.replies import LocalReplies
from smtpwarden.net.routing import RouteTable
from smtpwarden.net.upstream import Health, Target
from smtpwarden.observe.metrics import RelayMetrics
from smtpwarden.observe.txlog import RecordLog
from smtpwarden.protocol.extensions import ExtensionPolicy
from smtpwarden.protocol.records import Upstream
from smtpwarden.spool.store import Spool

if TYPE_CHECKING:
    from smtpwarden.net.session import Session


class Draining:
    """Whether the relay is shutting down; set once, by the relay."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


@dataclass(slots=True, kw_only=True)
class ListenerContext:
    """What every session of one listener shares."""

    name: str
    listener: ListenerConfig
    tls_context: ssl.SSLContext | None  # the listener's certificate, when it has tls
    admission: Admission  # per-address limits, shared by every listener
    target: Target  # where sessions connect: the listener route's first upstream
    routes: RouteTable  # the listener's route, and the recipient-domain routes on it
    spool: Spool | None  # where requeue puts what its replays could not deliver
    health: Health  # shared by every listener: which upstreams to skip
    config: Config
    records: RecordLog
    sessions: set[Session]
    policy_plain: ExtensionPolicy  # what EHLO offers before TLS
    policy_tls: ExtensionPolicy  # and once the client's connection is encrypted
    replies: LocalReplies
    epoch_offset: float
    next_id: Callable[[], str]
    on_end: Callable[[], None]  # a session ended, or its client connection closed
    capture: ListenerCapture  # whether sessions are recorded, and where transcripts go
    shutdown: Draining  # the relay's, shared by every context
    metrics: RelayMetrics | None = None  # None when the HTTP endpoint is off

    @property
    def draining(self) -> bool:
        """True once the relay is shutting down."""
        return self.shutdown.on

    @property
    def upstream_record(self) -> Upstream:
        """The upstream as records show it."""
        target = self.target
        return Upstream(name=target.name, address=target.host, port=target.port)
