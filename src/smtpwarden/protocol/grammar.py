"""RFC 5321 and extension grammar as compiled regular expressions.

Only patterns live here; the readers that apply them are in ``commands.py``
and ``replies.py``. Every pattern works on ``bytes``: wire data is never
decoded to parse it.
"""

from __future__ import annotations

import re

# RFC 5321 4.1.2: Mailbox / Path. A quoted local part may hold ">" and
# spaces, so the bracketed form is matched as a sequence of quoted strings
# and plain characters. Missing brackets are tolerated (many real clients
# omit them); the upstream remains the judge of what it accepts.
_PATH = rb'<(?:"(?:[^"\\]|\\.)*"|[^>"])*>|[^ \t<>]+'

MAIL_ARGUMENT = re.compile(rb"FROM:[ \t]*(" + _PATH + rb")(?:[ \t]+(.*))?\Z", re.I | re.S)
RCPT_ARGUMENT = re.compile(rb"TO:[ \t]*(" + _PATH + rb")(?:[ \t]+(.*))?\Z", re.I | re.S)

# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
ESMTP_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# esmtp-value = 1*(%d33-60 / %d62-126); RFC 6531 3.3 adds UTF-8 octets.
ESMTP_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+\Z")
# RFC 3461 4: xtext = *( xchar / hexchar ), hexchar = "+" 2(%x30-39 / %x41-46)
XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+\Z")
# RFC 1870 3: size-value = 1*20DIGIT
SIZE_VALUE = re.compile(rb"[0-9]{1,20}\Z")
# RFC 3461 4.1: NOTIFY=NEVER / 1#(SUCCESS / FAILURE / DELAY)
NOTIFY_VALUE = re.compile(
    rb"(?:NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*)\Z", re.I
)
# RFC 3461 4.2: ORCPT=addr-type ";" xtext (RFC 6533 allows UTF-8 in it)
ORCPT_VALUE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*;[\x21-\x7e\x80-\xff]+\Z")

# RFC 3030 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF, and
# nothing looser: every octet after a BDAT line is chunk data only if the
# upstream reads the line exactly as smtpwarden does, so extra blanks, tabs
# or an overlong size (which an upstream may refuse, and then read the chunk
# as commands) are refused here.
BDAT_ARGUMENT = re.compile(rb"([0-9]{1,10})(?: (LAST))?\Z", re.I)

# RFC 3463 2: status-code = class "." subject "." detail, at the start of
# the reply text when ENHANCEDSTATUSCODES is in use (RFC 2034).
ENHANCED_STATUS = re.compile(rb"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=[ \t]|\Z)")

# Control bytes other than HT have no place in a command line (RFC 5321
# 4.1.1: commands are printable text). NUL in particular is read as the end
# of a string by some upstreams.
COMMAND_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# RFC 5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39
REPLY_CODE = re.compile(rb"[2-5][0-5][0-9]\Z")
