"""Issue 16 in a real browser, as a new user meets it: progress on the first Inspect (the built-in model converts)
and during Score, results cleared on a new upload, Start refused on a rejected dataset, the Runs page following
a run to `completed` without a re-pick, no console errors on the golden path, and a Runs table and chart titles
that fit at 1400 px. This module's app gets an empty models folder, so its first Inspect really converts."""

import re
import time

import pytest

from tests.e2e.conftest import shot

pytestmark = [pytest.mark.browser, pytest.mark.slow]
STEPS = 3


def setup_home(home):
    (home / "models").unlink()  # the shared, already converted models folder: this app converts on its own
    (home / "models").mkdir()


def _collect(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    return errors


def _inspect(page):
    page.get_by_role("button", name="Inspect dataset").click()


def _summary_visible(page, timeout_ms=300000):
    page.get_by_text(re.compile(r"\d+ rows · format")).first.wait_for(timeout=timeout_ms)


def test_first_inspect_shows_what_it_is_doing(app_server, page):
    url, _, _ = app_server
    errors = _collect(page)
    page.goto(url, wait_until="load")
    page.get_by_role("button", name="Start training").wait_for(timeout=60000)
    _inspect(page)
    status = page.locator(".lg-status")
    status.first.wait_for(timeout=30000)
    seen = set()
    deadline = time.time() + 300
    while time.time() < deadline and not page.get_by_text(re.compile(r"\d+ rows · format")).count():
        if status.count():
            seen.add(status.first.inner_text())
        time.sleep(0.3)
    _summary_visible(page, 1000)
    assert any("First use of the model" in s for s in seen), seen  # the conversion says so, with seconds
    assert all(re.search(r"\(\d+ s\)", s) for s in seen)
    assert page.locator(".lg-status").count() == 0  # gone once the results are there
    shot(page, "16a-inspect-done")
    assert errors == []


def test_a_new_upload_clears_the_old_results_and_a_rejected_dataset_cannot_start(app_server, page, tmp_path):
    url, home, _ = app_server
    page.goto(url, wait_until="load")
    page.get_by_role("button", name="Start training").wait_for(timeout=60000)
    _inspect(page)
    _summary_visible(page)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [oops\n')
    page.locator("input[type=file]").first.set_input_files(str(bad))
    page.wait_for_function("() => !/\\d+ rows · format/.test(document.body.innerText)", timeout=30000)
    assert "Preview" in page.inner_text("body")
    # the old histogram goes too: its update may land a moment after the summary's on a busy machine
    page.locator("text=Token length per row").first.wait_for(state="hidden", timeout=30000)
    _inspect(page)
    page.get_by_text("line 2").first.wait_for(timeout=120000)
    assert "rejected" in page.inner_text("body")
    page.get_by_role("button", name="Start training").click()
    page.get_by_text(re.compile("Inspect refused this dataset")).first.wait_for(timeout=30000)
    shot(page, "16b-start-refused")
    assert not list((home / "runs").glob("*")) if (home / "runs").exists() else True


def test_golden_path_runs_page_follows_the_run_and_fits(app_server, page):
    url, home, _ = app_server
    errors = _collect(page)
    page.goto(url, wait_until="load")
    page.get_by_role("button", name="Start training").wait_for(timeout=60000)
    steps = page.get_by_label("max steps", exact=True).first
    steps.fill(str(STEPS))
    steps.press("Enter")
    time.sleep(1)
    _inspect(page)
    _summary_visible(page)
    page.get_by_role("button", name="Start training").click()
    page.get_by_text(re.compile(r"step [1-9]\d* / %d" % STEPS)).first.wait_for(timeout=300000)
    # the Train page's ETA line and the run status show one figure
    body = page.inner_text("body")
    etas = re.findall(r"ETA (?:of run \S+: ~)?(\d+ (?:min \d+ )?s)", body)
    page.get_by_role("tab", name="Runs").click()
    # visible ones only: the Train page's own status badge is in the DOM too, hidden with its tab
    page.get_by_text(re.compile(r"^(running|queued)$")).filter(visible=True).first.wait_for(timeout=30000)
    page.locator(".lg-badge", has_text="completed").filter(visible=True).first.wait_for(timeout=600000)  # no re-pick
    cells = """() => [...document.querySelectorAll('table td')].filter(td => td.getBoundingClientRect().width)
        .map(td => td.textContent.trim())"""
    deadline = time.time() + 30
    while "completed" not in page.evaluate(cells):  # the table follows too
        assert time.time() < deadline, f"the Runs table did not follow: {page.evaluate(cells)}"
        time.sleep(0.5)
    time.sleep(3)
    shot(page, "16c-runs-followed")
    assert page.get_by_role("button", name=re.compile("^Resume")).count() == 0 or not page.get_by_role(
        "button", name=re.compile("^Resume")).first.is_visible()
    # elements with text only: with wrap on, the Runs table's cells hold empty editor elements wider than their
    # box, which cut nothing (innerText counts clipped text too, so a cut label still shows here)
    cut = page.evaluate("""() => [...document.querySelectorAll('table th, table td, table th *, table td *')]
        .filter(c => c.offsetParent && c.innerText.trim() && c.scrollWidth > c.clientWidth + 1).map(c => c.innerText)""")
    assert cut == [], f"cells cut at 1400 px: {cut}"
    page.get_by_role("tab", name="Train").click()
    # the run has ended: the ETA line gave way to the next run's, from the form (run_view.wire's run_ended)
    page.get_by_text(re.compile(r"ETA for %d steps" % STEPS)).first.wait_for(timeout=30000)
    assert "ETA of run" not in page.inner_text("body")
    time.sleep(2)
    titles = page.evaluate("""() => [...document.querySelectorAll('svg.marks')].filter(s => s.getBoundingClientRect().width)
        .map(s => { const t = [...s.querySelectorAll('text')]; return t[t.length - 1].textContent; })""")
    for title in ("Tokens/s (non-padding)", "Memory (GB) vs estimate"):
        assert title in titles, titles
    legends = page.evaluate("""() => [...document.querySelectorAll('svg.marks g.role-legend text')]
        .filter(t => t.getBoundingClientRect().width).map(t => t.textContent)""")
    assert not [x for x in legends if x.endswith("…")], legends
    assert errors == [], errors
    print(f"ETA shown on the Train page during the run: {etas}")


def test_score_says_prompt_k_of_n(app_server, page):
    url, _, _ = app_server
    errors = _collect(page)
    page.goto(url, wait_until="load")
    page.get_by_role("tab", name="Chat").click()
    # the run trained above finished after this app built its pages: the Chat page's Run list fills in when the page
    # loads and again on the tab switch; Score scores the run picked there, so wait for it as a user does (at a load
    # average near 20, Score pressed before the list had filled in refused with "Pick a run first.")
    run = page.get_by_label("Run", exact=True).filter(visible=True).first
    deadline = time.time() + 60
    while not run.input_value():
        assert time.time() < deadline, "the Chat page's Run list did not fill in with the run trained above"
        time.sleep(0.5)
    page.get_by_role("button", name=re.compile("Score base vs adapter")).click()
    # the visible status: other panels (serve, report) keep hidden .lg-status elements in the DOM
    page.locator(".lg-status").filter(visible=True).first.wait_for(timeout=60000)
    page.get_by_text(re.compile(r"Scoring prompts.*\d+ / 20")).first.wait_for(timeout=300000)
    shot(page, "16d-scoring")
    assert errors == []
