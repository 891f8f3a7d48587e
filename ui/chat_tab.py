"""Chat page: talk to a trained adapter, side by side with the base model (or checkpoint A | checkpoint B, or the
run's exported GGUF in llama.cpp's runtime when llama-cpp-python is installed), with the demo eval prompts as
one-click examples and "score on eval split".

Sending is two steps chained with .success(): start_turn shows the user's message at once, then reply loads the
model (the first time: seconds) and streams the answers into the waiting bubbles."""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from core import events as ev
from core import chat, evaluate
from core.gguf import chat as gguf_chat
from core.runs import resolve as run_files
from core.runs import folder as runs
from core.errors import GarageError
from ui import marks, progress, serve_panel
from ui.refuse import refusal
from core.data import sft as data

SESSION = chat.ChatSession()  # one loaded base model per app process, shared by every browser tab
GGUF = gguf_chat.GgufChat()    # one exported GGUF open at a time, in llama.cpp's own child process
MODES = ["Side by side: base | adapter", "Adapter only", "Checkpoints: A | B"]
GGUF_MODE = "Side by side: GGUF | adapter"
FINAL = "final adapter"
LEFT = "Base model (or checkpoint A)"
GET_LLAMA_CPP = ("install llama-cpp-python 0.3.36 (`pip install llama-cpp-python==0.3.36`, which compiles llama.cpp; "
                 "the README's \"Run it in Ollama / llama.cpp / LM Studio\" says more) and restart the app")


@dataclass
class ChatTab:
    run_dd: gr.Dropdown
    refresh: tuple  # (fn, outputs) that re-lists runs; used when the Train / Runs pages open a run here


# ---------------------------------------------------------------- handlers

def run_choices() -> list[str]:
    """Runs that have something to chat with (a final adapter or a marked checkpoint), newest first."""
    return [r["id"] for r in runs.list_runs() if run_files.chattable(runs.get(r["id"]))]


def default_run() -> str | None:
    try:
        return run_files.resolve_run("latest").name
    except GarageError:
        choices = run_choices()
        return choices[0] if choices else None


def checkpoint_choices(run_id: str | None) -> list[str]:
    if not run_id:
        return []
    run_dir = runs.get(run_id)
    steps = [f"checkpoint {runs.checkpoint_step(p)}" for p in reversed(runs.checkpoints(run_dir))]
    final = [FINAL] if run_files.has_adapter(run_dir) else []
    return final + steps


def _checkpoint(label: str | None) -> int | None:
    if not label or label == FINAL:
        return None
    return int(label.split()[-1])


@dataclass
class RunPick:
    """What picking a run changes: both checkpoint dropdowns, the eval-prompt examples, the template note, and the
    run's GGUF exports with the line about them."""
    ck_a: dict
    ck_b: dict
    examples: dict
    note: str
    gguf: dict
    gguf_note: str


def on_run(run_id: str | None) -> RunPick:
    choices = checkpoint_choices(run_id)
    a = choices[0] if choices else None
    b = choices[1] if len(choices) > 1 else a
    examples = eval_prompts(run_id)
    if GGUF.run and GGUF.run != run_id:   # the page moved to another run: its llama.cpp child is not needed
        GGUF.close()
    ggufs = gguf_choices(run_id)
    return RunPick(gr.update(choices=choices, value=a), gr.update(choices=choices, value=b),
                   gr.update(choices=examples, value=None, visible=bool(examples)), template_note(run_id),
                   gr.update(choices=ggufs, value=ggufs[0][1] if ggufs else None, visible=bool(ggufs)),
                   gguf_note(run_id))


def modes() -> list[str]:
    """The chat modes; the GGUF one only where llama-cpp-python is installed (read when the page is built)."""
    return MODES + ([GGUF_MODE] if gguf_chat.runtime_installed() else [])


SHOWN_MODES = modes()   # what the page's Mode radio offers (set again when the page is built)


def gguf_choices(run_id: str | None) -> list[tuple[str, str]]:
    """(label, path) of the run's GGUF exports, newest first; none without llama-cpp-python (nothing to run them)."""
    if not gguf_chat.runtime_installed():
        return []
    return [(f"GGUF: {e.file}", str(e.path)) for e in gguf_chat.list_exports(run_id)]


def gguf_note(run_id: str | None, mode: str | None = None) -> str:
    """One line about chatting with the run's GGUF export: how to get llama-cpp-python, how to make an export, how
    to choose the GGUF mode, or (in that mode) what the two windows are."""
    if not run_id:
        return ""
    exports = gguf_chat.list_exports(run_id)
    if not gguf_chat.runtime_installed():
        have = (f"This run has a GGUF export ({exports[0].file}): to chat with it here beside the adapter, "
                if exports else "To chat with a run's GGUF export here beside its adapter, ")
        return have + GET_LLAMA_CPP + "."
    if not exports:
        return ("No GGUF export of this run yet: make one on the Runs page (Export to GGUF panel), then choose "
                f"\"{GGUF_MODE}\" here.")
    if GGUF_MODE not in SHOWN_MODES:
        return "llama-cpp-python was installed after the app started: restart the app to chat with the GGUF here."
    if mode == GGUF_MODE:
        return "The left window answers with the exported GGUF in llama.cpp's runtime, the right one with the adapter."
    return f"Choose \"{GGUF_MODE}\" to chat with the exported GGUF in llama.cpp's runtime beside the adapter."


def left_label(mode: str | None, gguf: str | None) -> str:
    return f"GGUF in llama.cpp: {Path(gguf).name}" if mode == GGUF_MODE and gguf else LEFT


def on_gguf(gguf: str | None) -> None:
    """Another GGUF picked: the open one's child ends now (the picked one opens with the first message)."""
    if GGUF.path is not None and str(GGUF.path) != gguf:
        GGUF.close()


def template_note(run_id: str | None) -> str:
    """The run's fallback-template notice (a base model without a chat template), read from its events."""
    if not run_id:
        return ""
    events, _ = ev.read(runs.get(run_id))
    notice = ev.template_notice(events)
    return f"**Note:** {notice}." if notice else ""


def eval_prompts(run_id: str | None) -> list[str]:
    if not run_id:
        return []

    items = data.demo_eval_set(runs.load_config(runs.get(run_id)).data.source) or []
    return [str(i["messages"][-1]["content"]) for i in items]


def _settings(system, max_new, temperature, top_p, rep, seed) -> dict:
    return {"system": system or "", "max_new_tokens": int(max_new), "temperature": float(temperature),
            "top_p": float(top_p), "repetition_penalty": float(rep), "seed": int(seed) if seed not in (None, "") and int(seed) >= 0 else None}


EMPTY_REPLY = "_(empty reply: the model ended its turn at once)_"
LOADING = "_(loading the model: the first message after picking a run takes a few seconds)_"


def _messages(history: list[dict]) -> list[dict]:
    """A chat window's history as messages for the model (it ends with the user's new message)."""
    return [{"role": m["role"], "content": "" if m["content"] == EMPTY_REPLY else m["content"]}
            for m in history if m.get("role") in ("user", "assistant")]


def start_turn(prompt, left, right, run_id, mode) -> tuple[str, list, list]:
    """Step 1 of sending, before any model loads: -> (the message, left, right) with the user's message and an
    empty reply bubble added to each window that answers (the right one only in adapter-only mode)."""
    prompt = (prompt or "").strip() if isinstance(prompt, str) else ""
    if not prompt:
        raise refusal("Type a message first.")
    if not run_id:
        raise refusal("No trained run to chat with yet: train one on the Train page (the cpu-demo preset takes minutes).")
    turn = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    left, right = list(left or []), list(right or [])
    if mode != MODES[1]:
        left += [dict(m) for m in turn]
    right += [dict(m) for m in turn]
    return prompt, left, right


def undo_turn(history: list | None, prompt: str) -> list:
    """The window without the turn start_turn added (when the reply failed: the message goes back in the box)."""
    history = list(history or [])
    if (len(history) >= 2 and history[-1] == {"role": "assistant", "content": ""}
            and history[-2].get("role") == "user" and history[-2].get("content") == prompt):
        return history[:-2]
    return history


def reply(prompt, left, right, run_id, ck_a, ck_b, mode, system="", max_new=128, temperature=0.0, top_p=0.9,
          rep=1.1, seed=-1, gguf=None) -> Iterator[tuple[list, list]]:
    """Step 2: stream the replies into the bubbles start_turn added; yields (left, right). Left: base (or
    checkpoint A, or the GGUF at path `gguf`); right: adapter (or checkpoint B)."""
    left, right = [dict(m) for m in left or []], [dict(m) for m in right or []]
    yield from _reply(left, right, run_id, ck_a, ck_b, mode, (system, max_new, temperature, top_p, rep, seed), gguf)
    for side in (left, right):  # say so when a model answered nothing, rather than showing a blank bubble
        if side and side[-1]["role"] == "assistant" and not side[-1]["content"].strip():
            side[-1]["content"] = EMPTY_REPLY
    yield left, right


def _loaded(run_id, ck_a, ck_b, mode) -> bool:
    try:
        wanted = [_checkpoint(ck_a)] + ([_checkpoint(ck_b)] if mode == MODES[2] else [])
        return bool(run_id) and all(SESSION.has_loaded(run_id, ck) for ck in wanted)
    except (GarageError, ValueError):
        return False  # load_run below says what is wrong


def _reply(left, right, run_id, ck_a, ck_b, mode, gen, gguf):
    settings = _settings(*gen)
    waiting = [side for side in (left, right) if side and side[-1]["role"] == "assistant"]
    if not _loaded(run_id, ck_a, ck_b, mode):  # loading takes seconds the first time: say so, and only then
        for side in waiting:
            side[-1]["content"] = LOADING
        yield left, right
    try:
        name_a = SESSION.load_run(run_id, _checkpoint(ck_a))
        name_b = SESSION.load_run(run_id, _checkpoint(ck_b)) if mode == MODES[2] else None
        for side in waiting:
            side[-1]["content"] = ""
        right_msgs = _messages(right[:-1])
        if mode == MODES[1]:  # adapter only: the right window
            for text in SESSION.stream(right_msgs, settings, adapter=name_a):
                right[-1]["content"] = text
                yield left, right
            return
        left_msgs = _messages(left[:-1])
        if mode == GGUF_MODE:  # the GGUF (llama.cpp, its own process) on the left, then the adapter on the right
            path = _gguf_path(run_id, gguf)
            for text in GGUF.stream(path, left_msgs, settings):
                left[-1]["content"] = text
                yield left, right
            for text in SESSION.stream(right_msgs, settings, adapter=name_a):
                right[-1]["content"] = text
                yield left, right
            return
        if mode == MODES[0] and left_msgs == right_msgs:  # same history: both grow together in one batch
            for base_text, adapter_text in SESSION.compare(left_msgs, settings, adapter=name_a):
                left[-1]["content"], right[-1]["content"] = base_text, adapter_text
                yield left, right
            return
        # histories differ, or A | B: one side after the other, each with its own history
        sides = ((left, left_msgs, name_a if mode == MODES[2] else None), (right, right_msgs, name_b or name_a))
        for side, msgs, adapter in sides:
            for text in SESSION.stream(msgs, settings, adapter=adapter):
                side[-1]["content"] = text
                yield left, right
    except GarageError as e:
        raise refusal(str(e))


def _gguf_path(run_id: str, gguf: str | None) -> Path:
    """The picked GGUF, if it is one of the run's exports (a path from the browser is checked, not trusted)."""
    exports = {str(e.path): e.path for e in gguf_chat.list_exports(run_id)}
    if not exports:
        raise GarageError(f"run {run_id} has no GGUF export to chat with",
                          "make one on the Runs page (Export to GGUF panel), or pick another mode")
    if gguf not in exports:
        raise GarageError("pick one of this run's GGUF exports first", "the GGUF list is next to the mode")
    return exports[gguf]


def stop_generation() -> None:
    SESSION.stop()
    GGUF.stop()


def score(run_id: str | None, ck_a: str | None, report=None) -> str:
    """The Score table; report(message, k, n) hears the loading and each prompt scored."""
    if not run_id:
        raise refusal("Pick a run first.")
    try:
        r = evaluate.evaluate(run_id, _checkpoint(ck_a), session=SESSION, progress=report, user_code=False)
    except GarageError as e:
        raise refusal(str(e))
    if r["metric"] == "accuracy":
        head = (f"**Eval split ({r['n']} held-out prompts, the dataset's checker):** base **{100 * r['base']:.0f}%** · "
                f"adapter **{100 * r['adapter']:.0f}%**")
        rows = "".join(f"<tr><td>{html.escape(x['prompt'])}</td><td>{marks.PASS if x['base_ok'] else marks.FAIL} "
                       f"{html.escape(x['base'][:120])}</td><td>{marks.PASS if x['adapter_ok'] else marks.FAIL} "
                       f"{html.escape(x['adapter'][:120])}</td></tr>" for x in r["rows"])
        return head + f"\n\n<table><tr><th>prompt</th><th>base</th><th>adapter</th></tr>{rows}</table>"
    if r["metric"] == "reward":
        return reward_table(r)
    return (f"**Perplexity on {r['split']} ({r['n']} examples, lower is better):** base **{r['base']:.2f}** · "
            f"adapter **{r['adapter']:.2f}**")


def reward_table(r: dict) -> str:
    """A GRPO run's Score: the mean reward of base and adapter, each reward's mean and full-marks share, and each
    prompt's two answers with their totals."""
    head = (f"**The run's rewards on {r['split']} ({r['n']} prompts, higher is better):** mean total base "
            f"**{r['base']:.2f}** · adapter **{r['adapter']:.2f}** (above zero: {100 * r['above_zero']['base']:.0f}% "
            f"· {100 * r['above_zero']['adapter']:.0f}%)")
    per = "".join(f"<tr><td>{html.escape(name)} x{r['weights'][name]:g}</td><td>{s['base']['mean']:.2f} "
                  f"({100 * s['base']['full']:.0f}% full marks)</td><td>{s['adapter']['mean']:.2f} "
                  f"({100 * s['adapter']['full']:.0f}% full marks)</td></tr>" for name, s in r["rewards"].items())
    rows = "".join(f"<tr><td>{html.escape(x['prompt'][:120])}</td><td>{x['base_reward']:.2f} "
                   f"{html.escape(x['base'][:120])}</td><td>{x['adapter_reward']:.2f} {html.escape(x['adapter'][:120])}"
                   f"</td></tr>" for x in r["rows"])
    note = f"\n\nNote: {html.escape(r['note'])}" if r["note"] else ""
    return (head + note + f"\n\n<table><tr><th>reward</th><th>base</th><th>adapter</th></tr>{per}</table>"
            f"\n\n<table><tr><th>prompt</th><th>base</th><th>adapter</th></tr>{rows}</table>")


# ---------------------------------------------------------------- layout

def build() -> ChatTab:
    first = default_run()
    SHOWN_MODES[:] = modes()
    with gr.Row():
        run_dd = gr.Dropdown(run_choices(), value=first, label="Run", scale=3,
                             info="A trained run (newest first); its base model loads once")
        ck_a = gr.Dropdown(checkpoint_choices(first), label="Adapter / checkpoint A", scale=2)
        ck_b = gr.Dropdown(checkpoint_choices(first), label="Checkpoint B (A | B mode)", scale=2)
        mode = gr.Radio(list(SHOWN_MODES), value=MODES[0], label="Mode", scale=3)
    first_ggufs = gguf_choices(first)
    with gr.Row(equal_height=True):
        gguf_dd = gr.Dropdown(first_ggufs, value=first_ggufs[0][1] if first_ggufs else None, scale=2,
                              label="GGUF export (llama.cpp)", visible=bool(first_ggufs),
                              info="This run's exports, newest first; it answers in the left window")
        gguf_md = gr.Markdown(gguf_note(first))
    with gr.Row():
        left = gr.Chatbot(label=LEFT, height=380, elem_classes=["lg-chat"])
        right = gr.Chatbot(label="With your adapter (or checkpoint B)", height=380, elem_classes=["lg-chat"])
    with gr.Row():
        prompt = gr.Textbox(placeholder="Ask something… (try: Who are you?)", show_label=False, scale=6)
        send_btn = gr.Button("Send", variant="primary", scale=1)
        stop_btn = gr.Button("Stop", variant="stop", scale=1)
        clear_btn = gr.Button("Clear", scale=1)
    note = gr.Markdown(template_note(first))
    examples = gr.Radio([], label="Held-out eval prompts (click to use)", visible=False)
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            system = gr.Textbox(label="System prompt", placeholder="(none: the model's template default)")
            max_new = gr.Slider(1, chat.MAX_NEW_TOKENS, value=128, step=1, label="max new tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p")
            rep = gr.Slider(0.5, 2, value=1.1, step=0.05, label="repetition penalty")
            seed = gr.Number(-1, label="seed (-1 = random)", precision=0)
    score_btn = gr.Button("Score base vs adapter on the eval split")
    score_status = gr.HTML()  # loading, then prompt k of n, while Score runs
    score_md = gr.Markdown()
    serve_panel.build()

    gen = [system, max_new, temperature, top_p, rep, seed]
    pending = gr.State("")  # the message being answered: the box is cleared at once, and refilled on an error

    def _picked(run_id):
        r = on_run(run_id)
        return {ck_a: r.ck_a, ck_b: r.ck_b, examples: r.examples, note: r.note, gguf_dd: r.gguf, gguf_md: r.gguf_note}

    picked = [ck_a, ck_b, examples, note, gguf_dd, gguf_md]
    run_dd.change(_picked, run_dd, picked)

    def _gguf_picked(path, m):
        on_gguf(path)
        return gr.update(label=left_label(m, path))

    gguf_dd.change(_gguf_picked, [gguf_dd, mode], left)
    mode.change(lambda m, path, rid: (gr.update(label=left_label(m, path)), gguf_note(rid, m)),
                [mode, gguf_dd, run_dd], [left, gguf_md])

    def _pick(evt: gr.SelectData):
        return evt.value

    examples.select(_pick, None, prompt)

    def _start(text, l, r, run_id, m):
        message, l, r = start_turn(text, l, r, run_id, m)
        return {prompt: "", pending: message, left: l, right: r}

    def _reply(message, l, r, *rest):
        try:
            for lv, rv in reply(message, l, r, *rest):
                yield {left: lv, right: rv}
        except gr.Error:
            yield {prompt: message, left: undo_turn(l, message), right: undo_turn(r, message)}
            raise

    # one reply at a time across every browser (one model in memory, and the CPU or GPU it runs on): the others
    # wait in Gradio's queue, which shows each its position in line on the chat windows, never an error
    for trigger in (send_btn.click, prompt.submit):
        trigger(_start, [prompt, left, right, run_dd, mode], [prompt, pending, left, right]).success(
            _reply, [pending, left, right, run_dd, ck_a, ck_b, mode] + gen + [gguf_dd], [prompt, left, right],
            concurrency_limit=1, concurrency_id="chat-reply")
    stop_btn.click(stop_generation, None, None, queue=False)
    clear_btn.click(lambda: {left: [], right: []}, None, [left, right])
    def _score(run_id, ck):
        yield {score_md: ""}
        try:
            table = yield from progress.stream(lambda report: score(run_id, ck, report),
                                               lambda line: {score_status: line})
        except Exception:
            yield {score_status: ""}
            raise
        yield {score_status: "", score_md: table}

    score_btn.click(_score, [run_dd, ck_a], [score_status, score_md])

    def _refresh(selected=None):
        choices = run_choices()
        value = selected if selected in choices else (default_run() if choices else None)
        return {run_dd: gr.update(choices=choices, value=value), **_picked(value)}

    return ChatTab(run_dd=run_dd, refresh=(_refresh, [run_dd] + picked))
