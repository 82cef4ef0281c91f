"""Type checks for values read from JSON or YAML (bundle manifests, configs).

There a ``true`` passes ``isinstance(value, int)`` and ``NaN`` is a float, so
"an integer" and "a number" need these stricter tests; one definition keeps
the bundle loader, the config check and serving in agreement.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite number (int or float), not a bool, NaN or infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
