"""Telling a service manager how the relay is doing: systemd's notify protocol.

Under a ``Type=notify`` unit, systemd sets ``NOTIFY_SOCKET`` to a datagram
socket and waits for ``READY=1`` before it takes the service for started:
``systemctl start`` (and units ordered after it) then wait until the
listeners accept connections, not merely until the process exists. The
relay, or the supervisor of ``workers``, says:

- ``READY=1`` once every listener accepts connections (under ``workers``,
  once a worker is ready, as ``/readyz`` says, and again as each other
  worker gets ready, with the count in its status line);
- ``RELOADING=1`` with ``MONOTONIC_USEC`` when a reload (SIGHUP) begins, and
  ``READY=1`` when it has ended, applied or refused;
- ``STOPPING=1`` when a stop begins;
- ``STATUS=`` a line for ``systemctl status``.

Without ``NOTIFY_SOCKET`` nothing is sent. A path starting with "@" is an
abstract socket. A message that cannot be sent is logged once and dropped:
telling the manager must never stop the relay. Workers are started without
``NOTIFY_SOCKET``: only the main process speaks (systemd's default
``NotifyAccess=main`` would drop theirs anyway).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Final

log = logging.getLogger("smtpwarden")

ENVIRONMENT: Final = "NOTIFY_SOCKET"


class Notifier:
    """Sends notify messages to ``NOTIFY_SOCKET``, if set (see the module docstring)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get(ENVIRONMENT)
        self._address: str | bytes | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return self._address is not None

    def ready(self, status: str) -> None:
        """Started, or a reload ended."""
        self._send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """A reload begins."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        """A stop begins."""
        self._send("STOPPING=1", "STATUS=shutting down")

    def _send(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._address)
        except OSError as error:
            if not self._failed:
                log.warning("cannot notify the service manager (%s): %s", ENVIRONMENT, error)
            self._failed = True


def without_notify_socket() -> dict[str, str]:
    """This process's environment without ``NOTIFY_SOCKET``, for a worker."""
    return {key: value for key, value in os.environ.items() if key != ENVIRONMENT}
