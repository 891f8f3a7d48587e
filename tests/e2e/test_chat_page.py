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
    # the waiting bubbles first say the model is loading. With the imports warmed at launch the tiny model loads
    # in a fraction of a second, too briefly for a polled wait (CI missed it once), so a MutationObserver set up
    # before Send records every text the bot bubbles ever show
    page.evaluate("""() => { window.lgSawLoading = false;
        new MutationObserver(() => { if ([...document.querySelectorAll('.message.bot')]
            .some(e => e.innerText.includes('loading the model'))) window.lgSawLoading = true; })
        .observe(document.body, {childList: true, subtree: true, characterData: true}); }""")
    page.get_by_role("button", name="Send").click()
    # then both show a growing answer while it streams
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message.bot:not(.pending)')]"
        ".filter(e => e.innerText.trim() && !e.innerText.includes('loading the model')).length >= 2",
        timeout=120000)
    # Gradio's dotted placeholder ('.message.bot.pending', read as "Loading content") may sit beside them
    first = page.locator(".message.bot:not(.pending)").all_inner_texts()
    page.wait_for_timeout(1500)
    later = page.locator(".message.bot:not(.pending)").all_inner_texts()
    assert len(later) == 2 and all(t.strip() and "loading the model" not in t for t in later), later
    assert sum(map(len, later)) >= sum(map(len, first))
    assert page.evaluate("() => window.lgSawLoading") is True
    shot(page, "05-chat-side-by-side")

    # the windows' label and icons (share, clear, copy) sit above the messages, not over the first bubble
    overlaps = page.evaluate("""() => [...document.querySelectorAll('.lg-chat')].map(c => {
        const top = c.querySelector('.top-panel'), msgs = c.querySelector('.bubble-wrap');
        return top && msgs ? top.getBoundingClientRect().bottom - msgs.getBoundingClientRect().top : null; })""")
    assert len(overlaps) == 2 and all(o is not None and o <= 0 for o in overlaps), overlaps

    # the model is loaded now: the next message's bubbles never say it is loading
    box.fill("Hi")
    page.get_by_role("button", name="Send").click()
    seen = page.evaluate("""() => new Promise(done => { let saw = false; const t0 = Date.now();
        const tick = () => { const bots = [...document.querySelectorAll('.message.bot')].map(e => e.innerText);
            if (bots.some(t => t.includes('loading the model'))) saw = true;
            const pending = document.querySelectorAll('.message.bot.pending').length;
            if ((bots.length === 4 && !pending && bots.every(t => t.trim())) || Date.now() - t0 > 120000) done(saw);
            else setTimeout(tick, 50); };
        tick(); })""")
    assert seen is False
    assert len(page.locator(".message.bot").all_inner_texts()) == 4
