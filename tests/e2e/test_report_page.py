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
    page.get_by_text("Report: did it work").first.wait_for(timeout=60000)
    page.get_by_text("No report for this adapter yet").first.wait_for(timeout=60000)
    page.get_by_role("button", name="Make the report").click()
    page.locator(".lg-report-verdict").get_by_text("Side effects").first.wait_for(timeout=600000)
    assert (home / "runs" / "tiny-run" / "report.json").is_file()
    page.get_by_text("The numbers behind it").first.click()
    page.get_by_text("Drift: neutral prompts").first.wait_for(timeout=10000)
    shot(page, "08-runs-report")
    assert errors == []
