"""A gamification `match.min_total` in a currency the program cannot convert to is refused at its
path, as a rule's `basket_total_at_least` is. Before, it was accepted and the achievement,
streak or challenge could never complete (no basket total converts to it)."""

from __future__ import annotations

from typing import Any

import pytest

from rules_svc.program import validate_program
from tests.rules import program_doc
from tests.rules.test_program_validation import errors_of

CHALLENGE = {"starts": "2026-01-01T00:00:00+00:00", "ends": "2026-02-01T00:00:00+00:00", "purchases": 3}
ITEMS: dict[str, dict[str, Any]] = {
    "achievements": {"id": "big", "name": "Big spender"},
    "streaks": {"id": "big", "name": "Big weeks", "weeks": 2},
    "challenges": {"id": "big", "name": "Big January", **CHALLENGE},
}


def _game(section: str, currency: str) -> dict[str, Any]:
    item = ITEMS[section] | {
        "match": {"min_total": {"currency": currency, "amount_minor": 5000}}, "reward": {"points": 500},
    }  # fmt: skip
    return {section: [item]}


@pytest.mark.parametrize("section", sorted(ITEMS))
def test_a_min_total_in_a_currency_without_a_rate_is_refused_at_its_path(section: str) -> None:
    errors = errors_of(program_doc(gamification=_game(section, "USD")))
    assert errors == [
        (f"gamification.{section}[0].match.min_total.currency", "USD has neither a base rate nor an FX rate")
    ]


@pytest.mark.parametrize("section", sorted(ITEMS))
def test_a_min_total_in_the_base_or_an_fx_currency_is_accepted(section: str) -> None:
    fx = {"base_currency": "EUR", "rates": [{"currency": "USD", "per_base": "1.08"}]}
    for currency in ("EUR", "USD"):
        validate_program(program_doc(gamification=_game(section, currency), fx=fx))


def test_a_version_stored_with_one_still_loads() -> None:
    """Refused at publish only: a live version keeps serving (its item never completed before either)."""
    program = validate_program(program_doc(gamification=_game("achievements", "USD")), stored=True)
    assert program.gamification.achievements[0].match.min_total is not None
