"""The value bounds every service enforces alike, so what one lets through the next can hold.

A posting of more than MAX_POINTS is a bug upstream (far inside int64, so sums of many stay
exact); a money amount over MAX_AMOUNT_MINOR would earn more than that at any real rate and,
summed on a shared funding account, overflow a 64-bit integer.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

MAX_POINTS = 10**15
MAX_AMOUNT_MINOR = 10**15
# How late an event fraud_svc scores may be dated: no velocity window reaches further back, so an
# older event could change no decision, and fraud_svc refuses it. The ledger refuses a spend dated
# earlier than this rather than let it pass unscored (fraud_svc's refusal would send it to the
# unavailable policy, which lets small redemptions through).
SCREENED_LATENESS = timedelta(days=35)
MAX_KEY_LENGTH = 128  # the ledger's longest idempotency key
KEY_PATTERN = re.compile(rf"^[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}$")  # an idempotency key: printable ASCII, no spaces


def key_digest(raw: str) -> str:
    """What stands for a key the ledger would not take: `sha256:<hex>`, the same every time."""
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def within_key_length(raw: str) -> str:
    """A key made by joining ids, as the ledger takes it: as it is, or past MAX_KEY_LENGTH
    characters its digest."""
    return raw if len(raw) <= MAX_KEY_LENGTH else key_digest(raw)
