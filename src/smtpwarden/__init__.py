"""smtpwarden: an SMTP-aware relay proxy.

It relays each SMTP session to an upstream MTA, parses every reply, writes one
JSON record per transaction, and never answers 2xx for a message it could still
lose.
"""

__version__ = "0.1.0"
