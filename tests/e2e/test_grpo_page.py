"""A GRPO run on the Train page in a real browser: the reward charts above the loss, the latest sampled
completions with their rewards, and Try rewards on the form (a table with a total; objective sft refused by name),
with 0 console and page errors. The run is a tiny untied model trained for 12 steps by the CLI before the app
starts. Screenshots land in artifacts/screenshots/."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, shot, visible_charts, wait_for_lines
from tests.helpers.tiny import build_tiny_model
from tests.helpers.grpo import E_SHARE, write_prompts, write_reward

pytestmark = [pytest.mark.browser, pytest.mark.slow]
REWARD_TITLE = "Reward (GRPO): mean, per function, spread"


def setup_home(home: Path) -> None:
    src = home.parent / "grpo-src"
    src.mkdir()
    build_tiny_model(src / "tiny", tie=False)
    write_prompts(src / "prompts.jsonl")
    write_reward(src / "e_share.py", E_SHARE)
    cmd = [sys.executable, "-m", "core", "train", "--model", str(src / "tiny"), "--dataset", str(src / "prompts.jsonl"),
           "--objective", "grpo", "--max-steps", "6", "--set", f"rewards.file={src / 'e_share.py'}",
           "--set", "rewards.length_weight=0.5", "--set", "train.grpo_generations=4",
           "--set", "train.grpo_max_completion=8", "--set", "train.lr=0.05", "--set", "train.scheduler=constant",
           "--set", "train.save_steps=3", "--set", "data.max_len=64", "--set", "lora.dropout=0"]
    env = dict(os.environ, LORA_GARAGE_HOME=str(home), HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _box(page, label: str):
    """A form field by its label alone (a Gradio label also holds the field's help text)."""
    name = page.locator("span", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
    return page.locator("label", has=name).locator("input, textarea").first


def _chart_top(page, title: str) -> float:
    return page.evaluate("""t => { const svg = [...document.querySelectorAll('svg.marks')].find(s =>
        s.getBoundingClientRect().width > 0 && [...s.querySelectorAll('text')].some(x => x.textContent === t));
        return svg ? svg.getBoundingClientRect().top + window.scrollY : null }""", title)


def test_grpo_run_view_and_try_rewards(app_server, page):
    url, home, _ = app_server
    src = home.parent / "grpo-src"
    errors = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url, wait_until="load")
    page.get_by_role("button", name="Start training").wait_for(timeout=120000)

    # the newest run is attached on load: the GRPO charts come first, then the loss
    table = page.locator("table", has=page.locator("th", has_text="completion")).filter(visible=True).first
    table.wait_for(timeout=60000)
    wait_for_lines(page, REWARD_TITLE, 3)  # total, its spread, and at least one reward function
    wait_for_lines(page, "Loss", 1)
    reward_top, loss_top = _chart_top(page, REWARD_TITLE), _chart_top(page, "Loss")
    assert reward_top is not None and loss_top is not None and reward_top < loss_top, (reward_top, loss_top)
    assert "Completions: mean length and share cut at the limit" in visible_charts(page)
    text = table.inner_text()
    assert "reward" in text and "file:e_share" in text and "length" in text, text
    assert re.search(r"\d\.\d\d", text) and "<|" not in text, text
    shot(page, "10-grpo-run-view")

    # Try rewards: refused by name for sft, a scored table for grpo
    model = page.get_by_label("Base model").first
    model.fill(str(src / "tiny"))
    model.press("Enter")
    _box(page, "Dataset").fill(str(src / "prompts.jsonl"))
    page.get_by_text("GRPO: rewards (objective grpo)", exact=True).first.click()
    _box(page, "file").fill(str(src / "e_share.py"))
    _box(page, "length weight").fill("0.5")
    try_btn = page.get_by_role("button", name=re.compile("Try rewards"))
    try_btn.click()
    page.get_by_text(re.compile("Try rewards is for GRPO: set objective to grpo")).first.wait_for(timeout=60000)
    assert "Traceback" not in page.inner_text("body")
    page.get_by_text("Preference (DPO / ORPO)", exact=True).first.click()
    page.get_by_label("grpo", exact=True).first.check()
    try_btn.click()
    total = page.locator("th", has_text=re.compile(r"^\s*total\s*$")).first
    total.wait_for(timeout=300000)
    scored = page.locator("table", has=total).first.inner_text()
    assert "file:e_share" in scored and "length" in scored and "Traceback" not in scored, scored
    total.scroll_into_view_if_needed()
    shot(page, "11-grpo-try-rewards")
    assert errors == [], errors
