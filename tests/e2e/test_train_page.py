"""The train-and-watch journey in a real browser: defaults, Start, live curve, reload mid-run, completed;
a bad upload; the VRAM panel following the settings. Screenshots land in artifacts/screenshots/."""

import json
import re
import time

import pytest

from tests.e2e.conftest import shot, wait_for_lines

pytestmark = [pytest.mark.browser, pytest.mark.slow]
STEPS = 6


def _number(page, label: str):
    return page.get_by_label(label, exact=True).first


def _progress_step(page) -> int:
    m = re.search(r"step (\d+) / \d+", page.inner_text("body"))
    return int(m.group(1)) if m else 0


def test_vram_panel_follows_batch_size_and_method(app_server, page):
    url, _, _ = app_server
    page.goto(url, wait_until="load")
    # without a GPU the panel speaks of RAM in fp32, the dtype a CPU run uses; a GPU size picked plans in 16-bit
    page.get_by_text(re.compile(r"LoRA \((fp32 base, CPU|16-bit base)\)")).first.wait_for(timeout=60000)
    page.get_by_label("Check against").first.click()
    page.get_by_role("option", name="8 GB", exact=True).click()
    page.get_by_text("Checked against a 8 GB GPU").wait_for(timeout=20000)
    before = page.inner_text("body")
    lora_before = re.search(r"LoRA \(16-bit base\).*?([\d.]+) GB", before, re.S).group(1)
    box = _number(page, "batch size")
    box.fill("16")
    box.press("Enter")
    page.wait_for_function(f"() => !document.body.innerText.includes('{lora_before} GB')", timeout=20000)
    after = page.inner_text("body")
    lora_after = re.search(r"LoRA \(16-bit base\).*?([\d.]+) GB", after, re.S).group(1)
    assert float(lora_after) > float(lora_before)
    page.get_by_label("qlora").first.check()
    page.get_by_text("QLoRA (4-bit base) (selected)").wait_for(timeout=20000)
    shot(page, "04-vram-panel-batch16-qlora")


def test_bad_upload_shows_a_clear_error(app_server, page, tmp_path):
    url, _, _ = app_server
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [oops\n')
    page.goto(url, wait_until="load")
    page.locator("input[type=file]").first.set_input_files(str(bad))
    page.wait_for_function("() => [...document.querySelectorAll('textarea, input')].some(e => e.value.endsWith('broken.jsonl'))",
                           timeout=30000)
    page.get_by_role("button", name="Inspect dataset").click()
    page.get_by_text("line 2").first.wait_for(timeout=300000)  # the first inspect may convert the built-in model
    body = page.inner_text("body")
    assert "broken.jsonl" in body and "Fix:" in body and "Traceback" not in body
    shot(page, "03-bad-upload")


def test_golden_path_with_reload_mid_run(app_server, page):
    url, home, _ = app_server
    page.goto(url, wait_until="load")
    page.get_by_role("button", name="Start training").wait_for(timeout=60000)
    steps = _number(page, "max steps")
    steps.fill(str(STEPS))
    steps.press("Enter")
    save = _number(page, "save steps")
    page.get_by_text("Training", exact=True).click()  # open the accordion that holds save steps
    save.fill("3")
    save.press("Enter")
    time.sleep(1)
    t0 = time.time()
    page.get_by_role("button", name="Start training").click()
    page.get_by_text(re.compile(r"step [1-9]\d* / %d" % STEPS)).first.wait_for(timeout=300000)
    first_point_s = time.time() - t0
    shot(page, "02a-training-live")

    page.reload(wait_until="load")  # (2) the run reattaches after a reload
    page.get_by_text(re.compile(r"Run \*?\*?smollm2")).first.wait_for(timeout=60000)
    page.get_by_text(re.compile(r"step [1-9]\d* / %d" % STEPS)).first.wait_for(timeout=60000)
    shot(page, "02b-after-reload")

    page.get_by_text("completed").first.wait_for(timeout=400000)
    assert _progress_step(page) == STEPS
    page.get_by_role("button", name="Chat with this adapter").wait_for()
    wait_for_lines(page, "Loss", 2)  # loss and smoothed, drawn (not just axes)
    shot(page, "02c-completed")
    # the ended run's ETA line is gone at once, and the next run's, from the form, follows (run_ended's change)
    page.get_by_text(re.compile(r"ETA for %d steps" % STEPS)).first.wait_for(timeout=30000)
    assert "ETA of run" not in page.inner_text("body")
    page.reload(wait_until="load")  # (3) the Runs page, filled by the page-load event while its tab is hidden
    page.get_by_role("button", name="Start training").wait_for(timeout=60000)
    page.get_by_role("tab", name="Runs").click()
    wait_for_lines(page, "Loss", 2)
    wait_for_lines(page, "Loss, smoothed, several runs", 1)
    shot(page, "02d-runs-page")
    run = next((home / "runs").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert len([e for e in events if e.get("type") == "metrics"]) == STEPS
    print(f"Start to first chart point: {first_point_s:.1f} s")


def test_every_settings_checkbox_is_wide_enough_to_read(app_server, page):
    """Issue 24's layout item: in a full settings row Gradio squeezed each Checkbox to about 30 px (min-width 0
    whatever its min_width): no label, and its help one word a line. Each one keeps 160 px."""
    url, _, _ = app_server
    page.goto(url, wait_until="load")
    page.get_by_role("button", name="Start training").wait_for(timeout=120000)
    for group in ("Advanced", "Training", "Quantization", "LoRA"):
        page.get_by_text(group, exact=True).first.click()
    page.wait_for_timeout(1000)
    widths = page.evaluate("() => [...document.querySelectorAll('.lg-check')]"
                           ".filter(e => e.offsetParent !== null).map(e => e.getBoundingClientRect().width)")
    assert widths and min(widths) >= 150, widths
    shot(page, "06-settings-open")
