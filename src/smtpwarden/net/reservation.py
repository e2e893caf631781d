"""Reserving the listeners' ports for the workers of ``workers``.

Before any worker starts, the supervisor binds one socket per address of
each listener, with SO_REUSEADDR and SO_REUSEPORT, and never calls listen
on it. The workers then bind the same address and port with SO_REUSEPORT
and listen; the kernel spreads new connections over the listening
sockets only, so a reserving socket never receives a client.

What the reservation buys:

- a listener with port 0 gets one port, chosen here, that every worker
  binds, and that stays bound while all workers are down between restarts:
  the kernel does not hand a bound port out as an ephemeral one, and a
  program binding it without SO_REUSEADDR is refused;
- a port another program already listens on is found once, here, with a
  clear error, instead of as every worker failing to start.

A host name may resolve to several addresses (``localhost``: 127.0.0.1
and ::1); each is reserved, all with the same port, as asyncio's
``create_server`` binds each of them. IPv6 sockets are IPv6-only, as
asyncio makes them.

Rule: nothing here accepts a connection or reads a byte.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Final

from smtpwarden.config import ListenerConfig

# A port 0 listener on several addresses takes the port the first address
# got; if another address has it taken, all are given back and tried again.
# Our choice: a collision is rare, several in a row would mean a host short
# of ports.
PORT_TRIES: Final = 8

_Address = tuple[socket.AddressFamily, tuple[object, ...]]


class Reservation:
    """The reserved sockets and, by listener name, the port each listener got."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self._sockets: list[socket.socket] = []

    def reserve(self, listeners: Iterable[ListenerConfig], *, exclusive: bool = True) -> None:
        """Reserve every listener's addresses; raises OSError naming the listener.

        ``exclusive``: a port some other process listens on, even with
        SO_REUSEPORT, is an error (``reuse_port: false``), not a share.
        On error nothing stays reserved.
        """
        try:
            for listener in listeners:
                try:
                    port, sockets = _reserve(listener.host, listener.port, exclusive)
                except OSError as error:
                    shown = f"[{listener.host}]" if ":" in listener.host else listener.host
                    raise OSError(
                        f"listener {listener.name}: cannot bind {shown}:{listener.port}: "
                        f"{error.strerror or error}"
                    ) from error
                self.ports[listener.name] = port
                self._sockets.extend(sockets)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Give every reserved address back; idempotent."""
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


def _addresses(host: str, port: int) -> list[_Address]:
    """The addresses ``create_server`` binds for ``host``, each once, in order."""
    found: list[_Address] = []
    for family, _, _, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        entry = (family, tuple(address))
        if entry not in found:
            found.append(entry)
    return found


def _reserve(host: str, port: int, exclusive: bool) -> tuple[int, list[socket.socket]]:
    """Bind every address of ``host`` on ``port`` (0: one free port for all)."""
    addresses = _addresses(host, port)
    if exclusive and port:
        for family, address in addresses:
            # Without SO_REUSEPORT a bind fails wherever anyone listens.
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    for attempt in range(PORT_TRIES):
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for family, address in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], chosen, *address[2:]))
                chosen = sock.getsockname()[1]
        except OSError as error:
            for sock in sockets:
                sock.close()
            retry = port == 0 and len(sockets) > 1 and error.errno == errno.EADDRINUSE
            if not retry or attempt == PORT_TRIES - 1:
                raise
            continue
        return chosen, sockets
    raise AssertionError("unreachable")  # the last try returns or raises
