"""A throw-away certificate authority and a certificate for the relay's listeners.

trustme issues a certificate for 127.0.0.1, localhost and relay.test; the
PEM files are written where the relay's configuration can name them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    certificate: Path
    key: Path
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts the throw-away CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def make_pki(folder: Path) -> Pki:
    """Issue the certificate and write cert.pem, key.pem and ca.pem into ``folder``."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost", "relay.test")
    certificate, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    certificate.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca=ca, certificate=certificate, key=key, ca_file=ca_file)
