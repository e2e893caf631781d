"""aiosmtpd's Proxy handler, startable from aiosmtpd's own command line.

aiosmtpd 1.4 passes CLASSARGS to a handler's ``from_cli`` and refuses them
for a class without one, which Proxy is; this subclass only adds it, so that
the matrix runs aiosmtpd as shipped:

    python -m aiosmtpd -n -l 127.0.0.1:PORT -c aiosmtpd_proxy.CliProxy HOST PORT

(with this folder on PYTHONPATH).
"""

from __future__ import annotations

from argparse import ArgumentParser

from aiosmtpd.handlers import Proxy


class CliProxy(Proxy):
    @classmethod
    def from_cli(cls, parser: ArgumentParser, *args: str) -> CliProxy:
        if len(args) != 2 or not args[1].isdigit():
            parser.error("CliProxy takes two arguments: upstream host and port")
        return cls(args[0], int(args[1]))
