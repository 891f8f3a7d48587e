"""Chat page: talk to a trained adapter, side by side with the base model (or checkpoint A | checkpoint B),
with the demo eval prompts as one-click examples and "score on eval split"."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from core import chat, runs
from core.errors import GarageError

SESSION = chat.ChatSession()  # one loaded base model per app process, shared by every browser tab
MODES = ["Side by side: base | adapter", "Adapter only", "Checkpoints: A | B"]
FINAL = "final adapter"


@dataclass
class ChatTab:
    run_dd: gr.Dropdown
    refresh: tuple  # (fn, outputs) that re-lists runs; used when the Train / Runs pages open a run here


# ---------------------------------------------------------------- handlers

def run_choices() -> list[str]:
    """Runs that have something to chat with (a final adapter or a marked checkpoint), newest first."""
    return [r["id"] for r in runs.list_runs()
            if r.get("has_adapter") or runs.latest_checkpoint(runs.get(r["id"]))]


def default_run() -> str | None:
    try:
        return chat.resolve_run("latest").name
    except GarageError:
        choices = run_choices()
        return choices[0] if choices else None


def checkpoint_choices(run_id: str | None) -> list[str]:
    if not run_id:
        return []
    run_dir = runs.get(run_id)
    steps = [f"checkpoint {runs.checkpoint_step(p)}" for p in reversed(runs.checkpoints(run_dir))]
    final = [FINAL] if (run_dir / "adapter" / "adapter_config.json").is_file() else []
    return final + steps


def _checkpoint(label: str | None) -> int | None:
    if not label or label == FINAL:
        return None
    return int(label.split()[-1])


def on_run(run_id: str | None):
    choices = checkpoint_choices(run_id)
    a = choices[0] if choices else None
    b = choices[1] if len(choices) > 1 else a
    examples = eval_prompts(run_id)
    return (gr.update(choices=choices, value=a), gr.update(choices=choices, value=b),
            gr.update(choices=examples, value=None, visible=bool(examples)), template_note(run_id))


def template_note(run_id: str | None) -> str:
    """The run's fallback-template notice (a base model without a chat template), read from its events."""
    if not run_id:
        return ""
    events, _ = runs.read_events(runs.get(run_id))
    notice = runs.template_notice(events)
    return f"**Note:** {notice}." if notice else ""


def eval_prompts(run_id: str | None) -> list[str]:
    if not run_id:
        return []
    from core import data

    items = data.demo_eval_set(runs.load_config(runs.get(run_id)).data.source) or []
    return [str(i["messages"][-1]["content"]) for i in items]


def _settings(system, max_new, temperature, top_p, rep, seed) -> dict:
    return {"system": system or "", "max_new_tokens": int(max_new), "temperature": float(temperature),
            "top_p": float(top_p), "repetition_penalty": float(rep), "seed": int(seed) if seed not in (None, "") and int(seed) >= 0 else None}


def _messages(history: list[dict], prompt: str) -> list[dict]:
    msgs = [{"role": m["role"], "content": "" if m["content"] == EMPTY_REPLY else m["content"]}
            for m in history if m.get("role") in ("user", "assistant")]
    return msgs + [{"role": "user", "content": prompt}]


EMPTY_REPLY = "_(empty reply: the model ended its turn at once)_"


def send(prompt, left, right, run_id, ck_a, ck_b, mode, *gen):
    """Stream replies into both chat windows. Left: base (or checkpoint A); right: adapter (or checkpoint B)."""
    left, right = list(left or []), list(right or [])
    for update in _send(prompt, left, right, run_id, ck_a, ck_b, mode, *gen):
        yield update
    for side in (left, right):  # say so when a model answered nothing, rather than showing a blank bubble
        if side and side[-1]["role"] == "assistant" and not side[-1]["content"].strip():
            side[-1]["content"] = EMPTY_REPLY
    yield "", left, right


def _send(prompt, left, right, run_id, ck_a, ck_b, mode, *gen):
    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error("Type a message first.")
    if not run_id:
        raise gr.Error("No trained run to chat with yet: train one on the Train page (the cpu-demo preset takes minutes).")
    settings = _settings(*gen)
    try:
        name_a = SESSION.load_run(run_id, _checkpoint(ck_a))
        name_b = SESSION.load_run(run_id, _checkpoint(ck_b)) if mode == MODES[2] else None
        left_msgs, right_msgs = _messages(left, prompt), _messages(right, prompt)
        turn = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        right.extend(dict(m) for m in turn)
        if mode == MODES[1]:  # adapter only: the right window
            for text in SESSION.stream(right_msgs, settings, adapter=name_a):
                right[-1]["content"] = text
                yield "", left, right
            return
        left.extend(dict(m) for m in turn)
        if mode == MODES[0] and left_msgs == right_msgs:  # same history: both grow together in one batch
            for base_text, adapter_text in SESSION.compare(left_msgs, settings, adapter=name_a):
                left[-1]["content"], right[-1]["content"] = base_text, adapter_text
                yield "", left, right
            return
        # histories differ, or A | B: one side after the other, each with its own history
        sides = ((left, left_msgs, name_a if mode == MODES[2] else None), (right, right_msgs, name_b or name_a))
        for side, msgs, adapter in sides:
            for text in SESSION.stream(msgs, settings, adapter=adapter):
                side[-1]["content"] = text
                yield "", left, right
    except GarageError as e:
        raise gr.Error(str(e))


def stop_generation() -> None:
    SESSION.stop()


def score(run_id: str | None, ck_a: str | None) -> str:
    if not run_id:
        raise gr.Error("Pick a run first.")
    try:
        r = chat.evaluate(run_id, _checkpoint(ck_a), session=SESSION)
    except GarageError as e:
        raise gr.Error(str(e))
    if r["metric"] == "accuracy":
        head = (f"**Eval split ({r['n']} held-out prompts, the dataset's checker):** base **{100 * r['base']:.0f}%** · "
                f"adapter **{100 * r['adapter']:.0f}%**")
        rows = "".join(f"<tr><td>{html.escape(x['prompt'])}</td><td>{'✅' if x['base_ok'] else '❌'} "
                       f"{html.escape(x['base'][:120])}</td><td>{'✅' if x['adapter_ok'] else '❌'} "
                       f"{html.escape(x['adapter'][:120])}</td></tr>" for x in r["rows"])
        return head + f"\n\n<table><tr><th>prompt</th><th>base</th><th>adapter</th></tr>{rows}</table>"
    return (f"**Perplexity on {r['split']} ({r['n']} examples, lower is better):** base **{r['base']:.2f}** · "
            f"adapter **{r['adapter']:.2f}**")


# ---------------------------------------------------------------- layout

def build() -> ChatTab:
    first = default_run()
    with gr.Row():
        run_dd = gr.Dropdown(run_choices(), value=first, label="Run", scale=3,
                             info="A trained run (newest first); its base model loads once")
        ck_a = gr.Dropdown(checkpoint_choices(first), label="Adapter / checkpoint A", scale=2)
        ck_b = gr.Dropdown(checkpoint_choices(first), label="Checkpoint B (A | B mode)", scale=2)
        mode = gr.Radio(MODES, value=MODES[0], label="Mode", scale=3)
    with gr.Row():
        left = gr.Chatbot(label="Base model (or checkpoint A)", height=380)
        right = gr.Chatbot(label="With your adapter (or checkpoint B)", height=380)
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
    score_md = gr.Markdown()

    gen = [system, max_new, temperature, top_p, rep, seed]
    run_dd.change(on_run, run_dd, [ck_a, ck_b, examples, note])
    def _pick(evt: gr.SelectData):
        return evt.value

    examples.select(_pick, None, prompt)
    inputs = [prompt, left, right, run_dd, ck_a, ck_b, mode] + gen
    send_btn.click(send, inputs, [prompt, left, right])
    prompt.submit(send, inputs, [prompt, left, right])
    stop_btn.click(stop_generation, None, None, queue=False)
    clear_btn.click(lambda: ([], []), None, [left, right])
    score_btn.click(score, [run_dd, ck_a], score_md)

    def _refresh(selected=None):
        choices = run_choices()
        value = selected if selected in choices else (default_run() if choices else None)
        return [gr.update(choices=choices, value=value)] + list(on_run(value))

    return ChatTab(run_dd=run_dd, refresh=(_refresh, [run_dd, ck_a, ck_b, examples, note]))
