"""Issue 24 in a real browser: a journey off the golden path (bad input, a run that fails at once, a slow run
stopped mid-step, a preset switch, Start with dpo on an SFT file) with 0 page errors and 0 console errors, every
message true to the files on disk, and no traceback in the app's log. The model is the tiny test Llama (a local
folder typed into the model box), so the runs take seconds; every step is slowed by the test-only fault
slow@step1 (4 s a step) so the Stop lands mid-step and waits for it. The stopped run's adapter is exported (its
phases k of n on screen), the export panel says why it will not export the failed run, and an Inspect outlives a
reload. Screenshots land in artifacts/."""

import json
import re
import time
from pathlib import Path

import psutil
import pytest

from core.data import pref as data_pref
from core.errors import DatasetError
from core.runs import folder as runs
from core.runs import resolve as run_files
from core.runs import stopping
from ui import export_panel

pytestmark = [pytest.mark.browser, pytest.mark.slow]
APP_ENV = {"LORA_GARAGE_FAULT": "slow@step1", "LORA_GARAGE_SLOW_STEP_S": "4"}  # a Stop waits for a 4 s step
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _fill(page, label: str, value: str):
    box = page.get_by_label(label, exact=True).first
    box.fill(value)
    box.press("Enter")


def _run_dirs(home: Path) -> list[Path]:
    d = home / "runs"
    return sorted((p for p in d.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if d.is_dir() else []


def _wait_state(run_dir: Path, states: tuple, timeout_s: float = 300) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = json.loads((run_dir / "status.json").read_text())
        if st.get("state") in states:
            return st
        time.sleep(0.5)
    raise AssertionError(f"{run_dir.name} did not reach {states}: {st}")


def _wait_lock_free(home: Path, run_dir: Path, timeout_s: float = 120):
    """The child writes its final state and then exits (saving takes a moment): wait for the process to go."""
    deadline = time.time() + timeout_s
    st = json.loads((run_dir / "status.json").read_text())
    while st.get("pid") and psutil.pid_exists(st["pid"]) and time.time() < deadline:
        try:
            if psutil.Process(st["pid"]).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.Error:
            break
        time.sleep(0.5)


def test_journey_off_the_golden_path(app_server, page, tiny_model_dir, tmp_path):
    url, home, _ = app_server
    errors: list[str] = []
    phase = ["page load"]  # each error names the part of the journey it came in
    page.on("console", lambda m: errors.append(f"[{phase[0]}] console.{m.type}: {m.text}") if m.type == "error"
            else None)
    page.on("pageerror", lambda e: errors.append(f"[{phase[0]}] pageerror: {e}"))
    page.goto(url, wait_until="load")
    start = page.get_by_role("button", name="Start training")
    start.wait_for(timeout=120000)
    model = page.get_by_label("Base model").first
    model.fill(str(tiny_model_dir))
    model.press("Enter")

    # Inspect's results outlive a reload: the same settings show them again without a new Inspect
    phase[0] = "inspect and reload"
    page.get_by_role("button", name="Inspect dataset").click()
    summary = page.locator("p", has_text="trained tokens per epoch").filter(visible=True).first
    summary.wait_for(timeout=300000)
    inspected = summary.inner_text().splitlines()[-1]  # "... trained tokens per epoch of N" (a locator's text is one line)
    page.reload(wait_until="load")
    start = page.get_by_role("button", name="Start training")
    start.wait_for(timeout=120000)
    model = page.get_by_label("Base model").first
    model.fill(str(tiny_model_dir))
    model.press("Enter")
    page.locator("p", has_text=inspected).filter(visible=True).first.wait_for(timeout=30000)
    _fill(page, "max steps", "40")

    # bad input: flagged when it changes, refused at Start, no run folder
    phase[0] = "bad input"
    _fill(page, "lr", "-1")
    page.get_by_text("learning rate must be > 0, got -1").first.wait_for(timeout=30000)
    start.click()
    page.get_by_text(re.compile("learning rate must be > 0")).nth(1).wait_for(timeout=30000)
    assert _run_dirs(home) == []
    _fill(page, "lr", "0.001")
    page.wait_for_function("() => !document.body.innerText.includes('learning rate must be > 0, got -1')",
                           timeout=30000)

    # a run that fails at once: every row longer than max_len, with overlong=drop
    phase[0] = "failed run"
    _fill(page, "max len", "16")
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_role("radio", name="drop", exact=True).first.check()
    time.sleep(1)
    start.click()
    page.get_by_text("nothing is left to train on").first.wait_for(timeout=300000)
    failed = _run_dirs(home)[-1]
    st = _wait_state(failed, ("failed",))
    time.sleep(3)  # what the page does after a failure is part of the journey
    assert st["error"]["message"] in page.inner_text("body").replace("\n", " ")
    _shot(page, "24-failed-run")
    _wait_lock_free(home, failed)

    # a slow run stopped mid-run: the page says what status.json says
    phase[0] = "stop"
    _fill(page, "max len", "256")
    page.get_by_role("radio", name="truncate", exact=True).first.check()
    time.sleep(1)
    start.click()
    page.get_by_text(re.compile(r"step [2-9] / 40")).first.wait_for(timeout=300000)
    slow = _run_dirs(home)[-1]
    page.get_by_role("button", name="Stop", exact=True).click()
    page.get_by_text(re.compile("[Ss]topping after the current step \\(about \\d+ s\\)")).first.wait_for(
        timeout=30000)
    _shot(page, "24-stopping")
    st = _wait_state(slow, ("stopped",))
    page.get_by_text(re.compile("Stopped and saved|was killed|nothing was saved")).filter(visible=True).first.wait_for(
        timeout=60000)
    body = page.inner_text("body").replace("\n", " ")
    clean, what, fix = stopping.outcome(slow, st)
    assert what[:1].upper() + what[1:] in body and fix in body
    ck = runs.latest_checkpoint(slow)
    assert ("Stopped and saved" in body) == (ck is not None and not st.get("error"))
    _shot(page, "24-stopped")

    # its adapter exported from the Train page, each phase on screen (k of n where it has one); a stop that had to
    # kill saved no adapter, and the page offers no export
    phase[0] = "export"
    _wait_lock_free(home, slow)
    export_btn = page.get_by_role("button", name="Export to GGUF / Ollama")
    if not run_files.has_adapter(slow):
        assert not export_btn.is_visible()
    else:
        export_btn.click()
        panel = page.locator(f"#{export_panel.TRAIN_PANEL_ID}")
        panel.get_by_role("button", name="Export GGUF").click()
        panel.get_by_text(re.compile(r"step \d/4|\d+ of \d+")).first.wait_for(timeout=600000)
        _shot(page, "24-export-phases")
        panel.get_by_text(re.compile("Parity check: (passed|FAILED)")).first.wait_for(timeout=600000)
        report = json.loads((home / "exports" / f"{slow.name}-gguf" / "export.json").read_text())
        verdict = "passed" if all(r["passed"] for r in report["parity"]) else "FAILED"
        assert f"Parity check: {verdict}" in panel.inner_text()
        _shot(page, "24-export-done")

    phase[0] = "runs page after the stop"
    page.get_by_role("tab", name="Runs").click()
    page.get_by_text(re.compile("Stopped and saved|was killed|nothing was saved")).filter(visible=True).first.wait_for(
        timeout=60000)
    time.sleep(3)
    _shot(page, "24-runs-after-stop")
    # the Runs page's export panel follows the open run: the failed one closes it and says why
    phase[0] = "runs page: failed run picked"
    pick = page.get_by_label("Open run").first
    pick.click()
    page.get_by_role("option", name=failed.name).click()
    page.get_by_text(f"{export_panel.TITLE}: not for this run").first.wait_for(timeout=30000)
    page.get_by_text(f"{export_panel.TITLE}: not for this run").first.click()
    page.get_by_text(f"Run {failed.name} has no final adapter to export (failed)").first.wait_for(timeout=30000)
    time.sleep(2)
    _shot(page, "24-runs-failed-run-export")
    page.get_by_role("tab", name="Train").click()

    # a preset switch resets what the preset does not name (the objective), and says so
    phase[0] = "preset switch"
    preset = page.get_by_label("Preset").first
    preset.click()
    page.get_by_role("option", name="cpu-dpo-demo").click()
    page.get_by_text("cpu-dpo-demo: preference tuning").first.wait_for(timeout=30000)
    page.get_by_text("Preference (DPO / ORPO)", exact=True).click()  # the accordion that holds the objective
    assert page.get_by_role("radio", name="dpo", exact=True).first.is_checked()
    preset.click()
    page.get_by_role("option", name="cpu-demo", exact=True).click()
    page.get_by_text("`train.objective` dpo → sft".replace("`", "")).first.wait_for(timeout=30000)
    assert page.get_by_role("radio", name="sft", exact=True).first.is_checked()

    # Start refuses dpo on an SFT file before a run folder exists, with the words Inspect gives
    phase[0] = "start refused"
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(4)))
    page.get_by_role("radio", name="dpo", exact=True).first.check()
    data = page.locator("label", has_text="a file or folder path, or a hub dataset id").locator("input").first
    data.fill(str(sft))
    data.press("Enter")
    time.sleep(1)
    with pytest.raises(DatasetError) as refused:  # the words Inspect and the child use for this file
        list(data_pref.read_pairs(str(sft)))
    words = refused.value.message
    before = _run_dirs(home)
    start.click()
    toast = page.get_by_text(words).filter(visible=True).first
    toast.wait_for(timeout=60000)
    assert _run_dirs(home) == before
    _shot(page, "24-start-refused")
    page.get_by_role("button", name="Inspect dataset").click()
    page.locator("p", has_text="rejected").filter(has_text=words).filter(visible=True).first.wait_for(timeout=300000)
    assert _run_dirs(home) == before
    time.sleep(2)

    assert errors == [], "\n".join(errors)
    log = "".join(p.read_text() for p in home.glob("app-*.log"))
    assert "Traceback" not in log, log[-3000:]
