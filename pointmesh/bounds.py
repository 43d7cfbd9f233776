"""The value bounds every service enforces alike, so what one lets through the next can hold.

A posting of more than MAX_POINTS is a bug upstream (far inside int64, so sums of many stay
exact); a money amount over MAX_AMOUNT_MINOR would earn more than that at any real rate and,
summed on a shared funding account, overflow a 64-bit integer.
"""

from __future__ import annotations

MAX_POINTS = 10**15
MAX_AMOUNT_MINOR = 10**15
