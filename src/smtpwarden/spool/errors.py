"""Errors of the spool.

``SpoolError`` means the spool could not do what it was asked; a failed
``put`` raises it (or its subclass ``SpoolFull``) and then nothing of the
message is left in ``queue/``. The relay answers such a put with a 4xx, never
250 (PRODUCT.md invariant 1). The exception text may name files and the OS
error: it is for logs, never for the wire.
"""

from __future__ import annotations

import errno


class SpoolError(Exception):
    """The spool could not store, read or change what it was asked to.

    ``errno`` is the OS error number behind it, when there is one.
    """

    def __init__(self, detail: str, *, errno: int | None = None) -> None:
        super().__init__(detail)
        self.errno = errno


class SpoolFull(SpoolError):
    """The file system is out of space or quota (ENOSPC, EDQUOT)."""


class NoSuchEntry(SpoolError):
    """No entry has this queue id (never had, or it was removed), or the id is malformed."""


class EntryBusy(SpoolError):
    """Another process or thread holds the entry's lock and the wait ran out."""


class CorruptEntry(SpoolError):
    """An envelope file does not parse, or its message file does not match it."""


class InvalidTransition(SpoolError):
    """The entry's state does not allow the change (e.g. releasing a queued entry)."""


# Out of space, or of the user's quota: an operator frees space and the same
# put then succeeds, so these get their own class.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def spool_error(action: str, error: OSError) -> SpoolError:
    """Wrap an OS error met while doing ``action``: SpoolFull or SpoolError."""
    cls = SpoolFull if error.errno in _FULL else SpoolError
    name = f" {error.filename}" if error.filename else ""
    return cls(f"{action}:{name} {error.strerror or error}", errno=error.errno)
