"""The Report section in a real browser: a finished run's report card on the Runs page (made on first open with
"Make the report"), showing the verdict and the same text lines as `python -m core report`; the run's end is worse
than its checkpoint 3, so "Export checkpoint 3" opens the export panel on that checkpoint and "Report at checkpoint
3" makes that checkpoint's report. No page or console error."""

import time

import pytest

from tests.e2e.conftest import shot

pytestmark = pytest.mark.browser


def setup_home(home):
    """A finished run on the tiny model (random non-zero LoRA B) trained on the demo dataset, without a report,
    whose eval loss was lowest at its kept checkpoint 3 and rose by the end (step 6)."""
    from core import events as ev
    from tests.helpers.runs import make_run
    from tests.helpers.tiny import build_tiny_model

    tiny = build_tiny_model(home / "tiny-model")
    run = make_run(home, tiny, run_id="tiny-run", checkpoints={3: True, 6: True},
                   data={"source": "builtin:demo-identity"})
    log = ev.EventLog(run)
    for step, loss in ((3, 0.9), (6, 1.3)):
        log.eval(step, loss)
    log.close()


def _wait_file(path, timeout_s):
    deadline = time.time() + timeout_s
    while not path.is_file():
        assert time.time() < deadline, f"{path} was not written in {timeout_s} s"
        time.sleep(1)


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
    page.locator(".lg-report-verdict:visible", has_text="checkpoint 3 has the best eval loss").first.wait_for(timeout=10000)
    page.locator("button:visible", has_text="The numbers behind it").first.click()
    text = page.locator("pre.lg-report-text:visible")
    text.wait_for(timeout=10000)
    assert "Drift: 40 neutral prompts" in text.inner_text()
    assert "python -m core export tiny-run --checkpoint 3" in text.inner_text()
    shot(page, "08-runs-report")

    # "Export checkpoint 3": the Runs page's export panel opens on that checkpoint, its folder named after it
    page.locator("button:visible", has_text="Export checkpoint 3").click()
    panel = page.locator("#lg-export-panel")
    folder = panel.get_by_label("Export folder (new or empty)")
    deadline = time.time() + 30
    while not folder.input_value().endswith("tiny-run-checkpoint-3-gguf"):
        assert time.time() < deadline, f"export folder is {folder.input_value()!r}"
        time.sleep(0.5)
    assert panel.get_by_role("combobox", name="Adapter").input_value() == "checkpoint 3"

    # "Report at checkpoint 3": that checkpoint's own report, made and shown
    page.locator("button:visible", has_text="Report at checkpoint 3").click()
    _wait_file(home / "runs" / "tiny-run" / "reports" / "checkpoint-3.json", 600)
    page.locator("pre.lg-report-text:visible", has_text="(checkpoint 3)").wait_for(timeout=60000)
    shot(page, "08-runs-report-checkpoint")
    assert errors == []
