"""Entry point for `python -m smtpwarden`; everything happens in `smtpwarden.cli`."""

from smtpwarden.cli import main

raise SystemExit(main())
