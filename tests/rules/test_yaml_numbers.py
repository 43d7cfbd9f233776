"""YAML 1.1 numbers that are not what they spell: `0100` is octal 64, `1:40` base 60 (100),
`1_000` a thousand. Before, `per_minor: 0100` was stored as 64 (a point per 64 cents) and
`per_base: 0161` as "113", while unquoted floats were already refused for the same reason."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.v1 import rules_pb2
from rules_svc.program import ProgramInvalid, load_program
from tests.conftest import RulesUnderTest
from tests.rules.test_rules_grpc import MONDAY, basket, doc, publish, totals

DOC = """
program: shop
default_timezone: Europe/Helsinki
channels: [pos]
stores: [{id: HEL-01, timezone: Europe/Helsinki}]
base_rates: [{currency: EUR, points: 1, per_minor: PER_MINOR}]
fx: {base_currency: EUR, rates: [{currency: JPY, per_base: PER_BASE}]}
"""


def _program(per_minor: str, per_base: str = "'161'") -> str:
    return DOC.replace("PER_MINOR", per_minor).replace("PER_BASE", per_base)


@pytest.mark.parametrize(
    ("per_minor", "read_as"),
    [("0100", "the octal number 64, not 100"), ("1:40", "the base-60 number 100"), ("1_00", "100; write numbers"),
     ("0x64", "the hexadecimal number 100"), ("0b1100100", "the binary number 100")],
)  # fmt: skip
def test_an_integer_yaml_reads_otherwise_than_written_is_refused_at_its_path(per_minor: str, read_as: str) -> None:
    with pytest.raises(ProgramInvalid) as refused:
        load_program(_program(per_minor))
    ((path, message),) = refused.value.errors
    assert path == "base_rates[0].per_minor"
    assert message.startswith(f"{per_minor} is read by YAML as {read_as}"), message


def test_every_misread_number_is_reported_and_a_quoted_one_is_taken_as_written() -> None:
    with pytest.raises(ProgramInvalid) as refused:
        load_program(_program("0100", "0161"))
    assert [path for path, _ in refused.value.errors] == ["base_rates[0].per_minor", "fx.rates[0].per_base"]
    program = load_program(_program("'0100'", "'0161'"))
    assert (program.base_rates[0].per_minor, program.fx and program.fx.rates[0].per_base) == (100, "0161")


def test_an_unquoted_time_of_day_is_refused_with_the_advice_to_quote_it() -> None:
    rule = "  - {id: hh, when: {time_window: {start: 18:00, end: '20:00'}}, effect: {bonus_points: 5}}"
    with pytest.raises(ProgramInvalid) as refused:
        load_program(doc(rule))
    ((path, message),) = refused.value.errors
    assert path == "rules[0].when.time_window.start"
    assert "base-60 number 1080; quote it ('18:00')" in message


async def test_publishing_a_leading_zero_rate_is_refused_and_nothing_earns_under_it(rules: RulesUnderTest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await publish(rules, "octal", _program("0100"), rules.clock.now())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [
        v.field for d in status_details(refused.value) if isinstance(d, error_details_pb2.BadRequest)
        for v in d.field_violations
    ]  # fmt: skip
    assert fields == ["base_rates[0].per_minor"]
    await publish(rules, "plain", _program("100"), rules.clock.now())
    found = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(MONDAY, 1000)))
    assert totals(found.evaluation) == {"points": 10}


@pytest.mark.parametrize(
    ("per_minor", "field"),
    [("99.99999999999999999", "base_rates[0].per_minor"),
     ("100.0", "base_rates[0].per_minor")],
)  # fmt: skip
def test_a_float_is_refused_even_when_it_came_out_whole(per_minor: str, field: str) -> None:
    """`99.99999999999999999` is not a whole number, yet YAML's binary float of it is exactly
    100.0, which pydantic took as 100: a rate nobody wrote, published without a word."""
    with pytest.raises(ProgramInvalid) as refused:
        load_program(_program(per_minor))
    ((path, message),) = refused.value.errors
    assert path == field
    assert "without a decimal point" in message, message


@pytest.mark.parametrize("points", ["1.00000000000000001", "1e0"])
def test_a_float_in_a_json_program_is_refused_at_its_path(points: str) -> None:
    document = (
        '{"program": "shop", "default_timezone": "Europe/Helsinki", "channels": ["pos"],'
        f' "base_rates": [{{"currency": "EUR", "points": {points}, "per_minor": 100}}]}}'
    )
    with pytest.raises(ProgramInvalid) as refused:
        load_program(document, fmt="json")
    assert [path for path, _ in refused.value.errors] == ["base_rates[0].points"]
