import pytest
"""The app serves its page on a free port, with the three tabs and the hardware bar."""

from tests.e2e.conftest import shot

pytestmark = pytest.mark.browser


def test_page_shows_three_tabs_and_cpu_only_bar(app_server, page):
    url, home, startup_s = app_server
    page.goto(url, wait_until="load")
    for tab in ("Train", "Chat", "Runs"):
        page.get_by_role("tab", name=tab).wait_for(timeout=30000)
    page.get_by_text("CPU only").first.wait_for(timeout=30000)
    page.get_by_role("button", name="Start training").wait_for()
    shot(page, "01-train-page")
    print(f"app start to first page: {startup_s:.1f} s")
