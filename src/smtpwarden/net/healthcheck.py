"""Active upstream health checks: connect, banner, EHLO and TLS, on a timer.

Sessions report the failures they meet to the circuit breaker
(``upstream.Health``); an idle relay meets none, and an upstream marked
down stays down until a session risks a probe. ``HealthChecker`` opens
every smtp upstream every ``health.check_interval`` seconds the way a
session does: the connection (implicit TLS included), the 220 banner, EHLO,
and for ``tls.mode: starttls`` STARTTLS, the handshake and EHLO again
(``deliverylink.secure``, as replays use it), then QUIT. A pass is
``Health.succeeded``, a failure ``Health.failed``. With
``health.check_starttls`` an upstream without ``tls`` is also asked for
STARTTLS after its EHLO, only to see its certificate: a failure there is
logged and never held against the upstream, which sessions use in plaintext.

The certificate an upstream presents is watched: its expiry goes to the
metrics, and one that expires within ``health.certificate_warning_days``
is logged as a warning, once per certificate.

Rule 1: one check per upstream at a time: each upstream has its own loop,
which waits ``check_interval`` after a check ends before it starts the
next; every step is bounded by the configured timeouts.

Rule 2: a check never sends MAIL. It must not deliver anything, and it
changes an upstream's state only through ``Health``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from smtpwarden.config import Config
from smtpwarden.net.delivery import QUIT_WAIT_S
from smtpwarden.net.deliverylink import Link, Stop, TlsPlan, connect, secure
from smtpwarden.net.tls import client_context
from smtpwarden.net.upstream import Health, Target
from smtpwarden.observe.metrics import RelayMetrics
from smtpwarden.protocol.extensions import Extensions, parse_ehlo

log = logging.getLogger("smtpwarden.healthcheck")

DAY_S: Final = 86400.0


@dataclass(slots=True)
class _Noted:
    """Where ``deliverylink.secure`` notes the TLS in use; a check keeps nothing."""

    tls: str | None = None


@dataclass(frozen=True, slots=True)
class Probe:
    """How one upstream is checked.

    ``plan`` is the TLS its sessions use (None without); ``extra`` the
    STARTTLS tried only to see the certificate (``health.check_starttls``
    on an upstream without TLS).
    """

    target: Target
    plan: TlsPlan | None
    extra: TlsPlan | None


def probe_for(target: Target, check_starttls: bool) -> Probe:
    """The probe of ``target``. Raises OSError or ssl.SSLError for a CA file that cannot load."""
    plan = TlsPlan.build(target, target.tls, target.context)
    extra = None
    if plan is None and check_starttls:
        tls = dataclasses.replace(target.tls, mode="starttls", required=False)
        extra = TlsPlan.build(target, tls, client_context(tls))
    return Probe(target=target, plan=plan, extra=extra)


class HealthChecker:
    """Checks upstreams on a timer and tells ``Health`` (see the module doc).

    ``clock`` gives epoch seconds, for certificate expiry.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        health: Health,
        config: Config,
        metrics: RelayMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._health = health
        self._metrics = metrics
        self._clock = clock
        self.probes = tuple(probe_for(target, config.health.check_starttls) for target in targets)
        self._last: dict[str, str | None] = {}  # each upstream's last failure, None: passed
        self._tls_failure: dict[str, str | None] = {}  # the same for the extra STARTTLS
        self._warned: dict[str, float] = {}  # the expiry last warned about

    def carry_from(self, other: HealthChecker) -> None:
        """Take over what ``other`` (the checker before a reload) has seen and said
        of each upstream it checked the same way: failures and certificate
        warnings already logged are not logged again. An upstream with another
        address or TLS starts afresh."""
        before = {probe.target.name: probe.target for probe in other.probes}
        for probe in self.probes:
            name = probe.target.name
            if before.get(name) != probe.target:
                continue
            if name in other._last:
                self._last[name] = other._last[name]
            if name in other._tls_failure:
                self._tls_failure[name] = other._tls_failure[name]
            if name in other._warned:
                self._warned[name] = other._warned[name]

    async def run(self) -> None:
        """Check every upstream, then again every ``check_interval``, until cancelled."""
        await asyncio.gather(*(self._watch(probe) for probe in self.probes))

    async def _watch(self, probe: Probe) -> None:
        interval = self._config.health.check_interval
        while True:
            try:
                await self.check(probe)
            except Exception:
                # A bug must not end the checks, nor count against the upstream.
                log.exception("upstream %s: health check failed to run", probe.target.name)
            await asyncio.sleep(interval)

    async def check(self, probe: Probe) -> str | None:
        """Check one upstream and report to ``Health``; returns the failure, or None."""
        failure = await self._attempt(probe)
        target = probe.target
        known = target.name in self._last
        previous = self._last.get(target.name)
        self._last[target.name] = failure
        if failure is None:
            self._health.succeeded(target)
            if known and previous is not None:
                log.info("upstream %s passes its health check again", target.name)
        else:
            self._health.failed(target)
            if failure != previous:
                log.warning("upstream %s: health check failed: %s", target.name, failure)
        if self._metrics is not None:
            self._metrics.checks.inc(target.name, "ok" if failure is None else "failed")
        return failure

    async def _attempt(self, probe: Probe) -> str | None:
        timeouts = self._config.timeouts
        try:
            link = await connect(probe.target, probe.plan, self._config.limits, timeouts.connect)
        except Stop as stop:
            return stop.reason
        polite = True
        try:
            offered = await self._greet(link, probe)
            self._watch_certificate(probe.target, link)
            if probe.extra is not None and "STARTTLS" in offered:
                polite = await self._look_at_tls(link, probe.target, probe.extra)
        except Stop as stop:
            await _leave(link, polite=stop.polite)
            return stop.reason
        except BaseException:
            link.abort()
            raise
        await _leave(link, polite=polite)
        return None

    async def _greet(self, link: Link, probe: Probe) -> Extensions:
        """Banner, EHLO and the TLS sessions use; the last EHLO's extensions."""
        config = self._config
        timeouts = config.timeouts
        banner = await link.reply("banner", timeouts.banner)
        if banner.code != 220:
            # RFC 5321 3.1: after a 554 greeting the server waits for QUIT.
            raise Stop(f"banner {banner.code} {banner.text[:80]}", polite=True)
        plan = probe.plan
        if plan is not None and plan.starttls != "none":
            offered = await secure(link, _Noted(), banner, config.hostname, plan, timeouts)
            if offered is not None:
                return offered
        await link.send(f"EHLO {config.hostname}\r\n".encode(), "EHLO", timeouts.reply)
        reply = await link.reply("EHLO", timeouts.reply)
        if reply.code // 100 != 2:
            raise Stop(f"EHLO {reply.code} {reply.text[:80]}", polite=True)
        return parse_ehlo(reply)

    async def _look_at_tls(self, link: Link, target: Target, plan: TlsPlan) -> bool:
        """STARTTLS only to see the certificate; False if the link is out of step."""
        timeouts = self._config.timeouts
        polite = True
        failure = None
        try:
            await link.send(b"STARTTLS\r\n", "STARTTLS", timeouts.reply)
            reply = await link.reply("STARTTLS", timeouts.reply)
            if reply.code != 220:
                raise Stop(f"STARTTLS {reply.code} {reply.text[:80]}", polite=True)
            polite = False
            await link.start_tls(plan.context, plan.server_name, timeouts.connect)
            polite = True
            self._watch_certificate(target, link)
        except Stop as stop:
            failure = stop.reason
            polite = polite and stop.polite
        previous = self._tls_failure.get(target.name)
        self._tls_failure[target.name] = failure
        if failure is not None and failure != previous:
            log.warning("upstream %s: STARTTLS check failed: %s", target.name, failure)
        return polite

    def _watch_certificate(self, target: Target, link: Link) -> None:
        der = link.peer_certificate()
        expires = None if der is None else certificate_expiry(der)
        if expires is None:
            return
        if self._metrics is not None:
            self._metrics.certificate_expiry.set(expires, target.name)
        left_days = (expires - self._clock()) / DAY_S
        if left_days >= self._config.health.certificate_warning_days:
            return
        if self._warned.get(target.name) == expires:
            return
        self._warned[target.name] = expires
        when = datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat()
        if left_days < 0:
            log.warning(
                "upstream %s: its TLS certificate expired %.1f days ago (%s)",
                target.name,
                -left_days,
                when,
            )
        else:
            log.warning(
                "upstream %s: its TLS certificate expires in %.1f days (%s)",
                target.name,
                left_days,
                when,
            )


async def _leave(link: Link, *, polite: bool) -> None:
    if polite:
        await link.quit(QUIT_WAIT_S)
    else:
        link.abort()


# --- The expiry of a DER certificate (RFC 5280 4.1) ----------------------------

_SEQUENCE: Final = 0x30
_EXPLICIT_VERSION: Final = 0xA0  # [0] EXPLICIT Version, absent for v1
_UTC_TIME: Final = 0x17
_GENERALIZED_TIME: Final = 0x18
# A DER length of more than 4 octets would describe a certificate beyond 4 GiB.
_MAX_LENGTH_OCTETS: Final = 4


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at ``at``: (tag, start of its content, end). Raises ValueError."""
    if at + 2 > len(der):
        raise ValueError("truncated")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= _MAX_LENGTH_OCTETS or at + size > len(der):
            raise ValueError("bad length")
        length = int.from_bytes(der[at : at + size], "big")
        at += size
    if at + length > len(der):
        raise ValueError("truncated")
    return tag, at, at + length


def _expect(der: bytes, at: int, tag: int) -> tuple[int, int]:
    found, start, end = _element(der, at)
    if found != tag:
        raise ValueError(f"tag {found:#x} where {tag:#x} was expected")
    return start, end


def certificate_expiry(der: bytes) -> float | None:
    """The notAfter time of a DER certificate, as epoch seconds; None if unreadable.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE
    { notBefore, notAfter }, ... }, ... }. RFC 5280 4.1.2.5: times are
    UTCTime (YYMMDDHHMMSSZ) through 2049, GeneralizedTime after, always in
    UTC with seconds.
    """
    try:
        certificate, _ = _expect(der, 0, _SEQUENCE)
        at, _ = _expect(der, certificate, _SEQUENCE)
        tag, _, end = _element(der, at)
        if tag == _EXPLICIT_VERSION:
            at = end
        for _ in range(3):  # serialNumber, signature, issuer
            _, _, at = _element(der, at)
        validity, _ = _expect(der, at, _SEQUENCE)
        _, _, at = _element(der, validity)  # notBefore
        tag, start, end = _element(der, at)
        text = der[start:end].decode("ascii")
        if tag == _UTC_TIME:
            # RFC 5280 4.1.2.5.1: YY >= 50 is 19YY, else 20YY.
            text = ("19" if int(text[:2]) >= 50 else "20") + text
        elif tag != _GENERALIZED_TIME:
            return None
        moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    except ValueError:  # UnicodeDecodeError included
        return None
    return moment.replace(tzinfo=datetime.UTC).timestamp()
