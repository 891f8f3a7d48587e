"""The Report section in a real browser: a finished run's report card on the Runs page (made on first open with
"Make the report"), showing the verdict, with no page or console error."""

import pytest

from tests.e2e.conftest import shot

pytestmark = pytest.mark.browser


def setup_home(home):
    """A finished run on the tiny model (random non-zero LoRA B) trained on the demo dataset, without a report."""
    from tests.helpers.runs import make_run
    from tests.helpers.tiny import build_tiny_model

    tiny = build_tiny_model(home / "tiny-model")
    make_run(home, tiny, run_id="tiny-run", data={"source": "builtin:demo-identity"})


def test_the_runs_page_makes_and_shows_the_report(app_server, page):
    url, home, _ = app_server
    errors = []
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.goto(url, wait_until="load")
    page.get_by_role("tab", name="Runs").click()
    page.locator("h3:visible", has_text="Report: did it work").wait_for(timeout=60000)  # the Train page has one too
    page.locator("p:visible", has_text="No report for this adapter yet").first.wait_for(timeout=60000)
    page.locator("button:visible", has_text="Make the report").click()
    page.locator(".lg-report-verdict span:visible", has_text="side effects").first.wait_for(timeout=600000)
    assert (home / "runs" / "tiny-run" / "report.json").is_file()
    page.locator("button:visible", has_text="The numbers behind it").first.click()
    page.locator("h4:visible", has_text="Drift: neutral prompts").wait_for(timeout=10000)
    shot(page, "08-runs-report")
    assert errors == []
