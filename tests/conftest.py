"""Suite-wide settings: Hypothesis profiles.

``default`` keeps the suite fast; ``long`` (HYPOTHESIS_PROFILE=long) runs the
property tests for many more examples when hunting for rare inputs.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("default", deadline=None)
# Properties that cost milliseconds an example cap their own count
# (tests/unit/strategies.py, ``scaled``), so ``long`` fits the test timeout.
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
