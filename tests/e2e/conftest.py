"""The real app on a free localhost port, driven by Playwright through Debian's chromium."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.net import free_port

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def app_server(tmp_path_factory, request, shared_models):
    """Start `python app.py` with its own home; yield (url, home). Extra env comes from the module's APP_ENV."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is missing: `make test` installs it (apt-get install chromium)")
    home = tmp_path_factory.mktemp("app-home")
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    env = dict(os.environ, LORA_GARAGE_HOME=str(home), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    env.update(getattr(request.module, "APP_ENV", {}))
    setup = getattr(request.module, "setup_home", None)
    if setup:
        setup(home)
    # Gradio's own start-up check (a HEAD request with a 3 s timeout) can fail on a saturated machine; that is
    # the check failing, not the app, so more tries on a new port are allowed, and only for that message (at a load
    # average of 24 on 2 cores, two tries in a row failed).
    for attempt in range(1, 5):
        proc, url, t0, log = _start(home, env)
        if proc is not None:
            break
        if attempt == 4 or "localhost is not accessible" not in log:
            raise RuntimeError(f"app did not start:\n{log}")
    yield url, home, time.time() - t0
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:  # still busy (e.g. mid-generation): the test is over, end it
        os.killpg(proc.pid, 9)
        proc.wait(timeout=20)
    end_runs(home)


def end_runs(home) -> None:
    """Kill the training children of the app's runs that are still going: a run has its own process group and
    outlives the app by design, so without this a test's run trained on through the rest of the suite, slowing it."""
    for status in (home / "runs").glob("*/status.json"):
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):
            continue
        pid = st.get("pid") if st.get("state") in ("queued", "running", "stopping") else None
        pending = status.parent / "report.pending"  # a completed run's child still writing its report card
        if pid is None and pending.exists():
            try:
                pid = int(pending.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
        if pid:
            try:
                os.killpg(pid, 9)  # the child leads its own group (its ranks and helpers with it)
            except ProcessLookupError:
                pass  # it ended between the read and the kill: nothing left to end


def _start(home, env):
    """(proc, url, t0, "") once the page answers, or (None, None, t0, app.log text) if the app exited."""
    port = free_port()
    log_path = home / f"app-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while time.time() - t0 < 180:
        if proc.poll() is not None:
            return None, None, t0, log_path.read_text()
        try:
            urllib.request.urlopen(url, timeout=5)
            return proc, url, t0, ""
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise RuntimeError(f"app did not answer in 180 s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    yield pg
    ctx.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


_CHARTS_JS = """() => Array.from(document.querySelectorAll('svg.marks'))
  .filter(svg => svg.getBoundingClientRect().width > 0)
  .map(svg => {
    const texts = Array.from(svg.querySelectorAll('text')).map(t => t.textContent);
    const lines = Array.from(svg.querySelectorAll('g.mark-line path'))
      .filter(p => (p.getAttribute('d') || '').length > 10 && (p.getAttribute('stroke') || 'none') !== 'none');
    return {title: texts[texts.length - 1], lines: lines.length, broken: texts.some(t => t.includes('Infinity'))};
  })"""


def visible_charts(page) -> dict[str, dict]:
    """Each visible chart by title: how many coloured lines vega drew, and whether its legend is broken (a colour
    scale built before its data came shows an 'Infinity' legend and draws no line)."""
    return {c["title"]: c for c in page.evaluate(_CHARTS_JS)}


def wait_for_lines(page, title: str, n: int, timeout_s: float = 30) -> dict:
    deadline = time.time() + timeout_s
    while True:
        chart = visible_charts(page).get(title)
        if chart and chart["lines"] >= n and not chart["broken"]:
            return chart
        if time.time() > deadline:
            raise AssertionError(f"chart {title!r} did not draw {n} lines: {visible_charts(page)}")
        time.sleep(0.5)
