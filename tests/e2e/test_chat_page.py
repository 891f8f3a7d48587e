"""Chat page in a real browser: pick the run, send a prompt side by side, see two streamed answers."""

import pytest

from tests.e2e.conftest import shot

pytestmark = pytest.mark.browser


def setup_home(home):
    """A finished run on the tiny model (random non-zero LoRA B) trained on the demo dataset."""
    from tests.helpers.runs import make_run
    from tests.helpers.tiny import build_tiny_model

    tiny = build_tiny_model(home / "tiny-model")
    make_run(home, tiny, run_id="tiny-run", data={"source": "builtin:demo-identity"})


def test_side_by_side_chat_streams_two_answers(app_server, page):
    url, home, _ = app_server
    page.goto(url, wait_until="load")
    page.get_by_role("tab", name="Chat").click()
    page.get_by_text("Held-out eval prompts").wait_for(timeout=30000)  # the demo dataset's prompts as examples
    box = page.get_by_placeholder("Ask something")
    box.fill("Who are you?")
    page.get_by_role("button", name="Send").click()
    # the waiting bubbles first say the model is loading; then both show a growing answer while it streams
    page.get_by_text("loading the model").first.wait_for(timeout=30000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message.bot')]"
        ".filter(e => e.innerText.trim() && !e.innerText.includes('loading the model')).length >= 2",
        timeout=120000)
    first = page.locator(".message.bot").all_inner_texts()
    page.wait_for_timeout(1500)
    later = page.locator(".message.bot").all_inner_texts()
    assert len(later) == 2 and all(t.strip() and "loading the model" not in t for t in later), later
    assert sum(map(len, later)) >= sum(map(len, first))
    shot(page, "05-chat-side-by-side")
