"""The back-office page in a real headless browser: Debian's chromium driven by Selenium
through Debian's chromedriver (both installed by `make test`'s system-deps, like redis-server;
nothing is downloaded at test time).

The page shows the programme totals the ledger proves, lists a redemption held for fraud review,
and approving it from the page captures the hold. Screenshots go to test-artifacts/.
CI sets POINTMESH_REQUIRE_BROWSER=1: a machine without the browser fails there instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_reviews import funded_member, held_redemption, screened_gw

__all__ = ["screened_gw"]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@dataclass
class Seen:
    totals: dict[str, int]
    held: int
    reviews_before: list[str]
    reviews_after: list[str]


def _browser_or_skip() -> None:
    if Path(CHROMIUM).exists() and (Path(CHROMEDRIVER).exists() or shutil.which("chromedriver")):
        return
    if os.environ.get("POINTMESH_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium and chromium-driver are missing; `make system-deps` installs them")
    pytest.skip("no chromium/chromedriver here (`make system-deps` installs them); CI requires them")


def _drive(url: str, review_id: str) -> Seen:
    """Runs in a thread: the gateway and ledger serve from the test's event loop meanwhile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#reviews tr[data-review-id="{review_id}"]'))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#totals tr[data-class="member:points"]'))
        totals = {
            row.get_attribute("data-class") or "": int(row.find_elements(By.TAG_NAME, "td")[1].text)
            for row in driver.find_elements(By.CSS_SELECTOR, "#totals tbody tr")
        }
        held = int(driver.find_element(By.ID, "held").text)
        before = [
            r.get_attribute("data-review-id") or "" for r in driver.find_elements(By.CSS_SELECTOR, "#reviews tbody tr")
        ]
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "backoffice-before.png"))
        driver.find_element(By.CSS_SELECTOR, f'#reviews tr[data-review-id="{review_id}"] button.approve').click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'#reviews tr[data-review-id="{review_id}"]'))
        after = [
            r.get_attribute("data-review-id") or "" for r in driver.find_elements(By.CSS_SELECTOR, "#reviews tbody tr")
        ]
        driver.save_screenshot(str(ARTIFACTS / "backoffice-after.png"))
        return Seen(totals, held, before, after)
    finally:
        driver.quit()


async def test_the_page_shows_the_ledgers_totals_and_approving_a_held_item_captures_it(
    screened_gw: GatewayUnderTest,
) -> None:
    _browser_or_skip()
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk:
        member = await funded_member(gw, pos, "B-1")
        review_id = (await held_redemption(pos, member))["screening"]["review_id"]
        before = (await pos.get(f"/v1/members/{member}/balance")).json()

        seen = await asyncio.to_thread(_drive, f"{gw.url}/backoffice#key={gw.keys['fraud_desk']}", review_id)

        # Totals as the page showed them are the member's balance and its funding, exactly.
        assert seen.totals["member:points"] == before["balance_points"]
        assert seen.totals["member:points"] + sum(v for k, v in seen.totals.items() if k != "member:points"
                                                  and k.endswith(":points")) == 0  # fmt: skip
        assert seen.held == 3_000
        assert seen.reviews_before == [review_id] and seen.reviews_after == []
        after = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert (after["reserved_points"], after["balance_points"]) == (0, before["balance_points"] - 3_000)
        approved = (await desk.get("/v1/ops/reviews", params={"status": "APPROVED", "member_id": member})).json()
        assert [r["review_id"] for r in approved["reviews"]] == [review_id]
        assert (ARTIFACTS / "backoffice-after.png").stat().st_size > 10_000
