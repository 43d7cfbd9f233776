"""RFC 9457 3.1.5: a problem's `instance` is a URI reference. The gateway fills it with the
request's decoded path, so a path id with a space, a quote, `<`/`>`, a control character or
any non-ASCII character comes back as text that is no URI reference at all."""

from __future__ import annotations

import re

from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import problem

# RFC 3986 URI-reference characters: unreserved, reserved and percent-encoded octets.
URI_REFERENCE = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


async def test_a_problem_instance_is_a_uri_reference_whatever_path_id_was_sent(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        for sent in ("/v1/members/a%20b", "/v1/members/%E2%82%AC", "/v1/purchases/a%22b", "/v1/holds/x%3Cy%3E",
                     "/v1/members/%00"):  # fmt: skip
            refused = problem(await pos.get(sent), 400)
            assert URI_REFERENCE.fullmatch(refused["instance"]), (sent, refused["instance"])
