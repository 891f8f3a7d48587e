"""A run's report card, report.json: did the fine-tune learn what its data teaches, what did it change outside its
task, is it healthy, and a verdict in plain words built from those numbers with the thresholds in THRESHOLDS.

    task    a GRPO run: its own rewards on held-out prompts, base vs adapter (core.evaluate.reward_scores); else
            held-out loss / perplexity of base and adapter (the eval split; for the built-in demo its shipped
            held-out prompts with reference replies; else the training rows, said so), up to 20 prompts answered
            side by side with the data's own reply and ROUGE-L to it, and the dataset's checker where it has one
    drift   the built-in neutral prompts (builtin_data/neutral_prompts.jsonl): the base answers each greedily; on
            those tokens, teacher-forced, the mean per-token KL(base || adapter); the share of answers changed within
            DRIFT_TOKENS tokens; the most changed. Again without the run's system prompt, where it set one.
    health  update norm ||BA|| / ||W|| per adapted module, "no effect", overfitting from the eval-loss history,
            divergence (NaN skips, loss spikes) from events.jsonl

Written atomically; a report older than its adapter is stale and made again. The final adapter's is
<run>/report.json, checkpoint N's <run>/reports/checkpoint-N.json. The training child makes the final one right
after the adapter is saved (make_at_run_end: a failure is recorded in report.json and events.jsonl, never turns the
run into a failed one); `python -m core report` and the app make it on first open for older runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from core import events as ev
from core.chat import ChatSession, GenSettings, message_text
from core.data import sft as data
from core.data.read import BUILTIN_DATA
from core.data.tokenize import PackedRows
from core.errors import GarageError, RunError
from core.evaluate import reward_scores
from core.runs import folder as runs
from core.runs import procs
from core.runs import resolve as run_files

VERSION = 2                         # 2: overfitting names the best kept checkpoint (better_checkpoint)
FILE = "report.json"
PENDING = "report.pending"          # the training child's pid while it writes the report
NEUTRAL_PROMPTS = BUILTIN_DATA / "neutral_prompts.jsonl"
ANSWERS = 20                        # prompts answered side by side
ANSWER_TOKENS = 64                  # answer length for the task prompts (eval's default)
DRIFT_TOKENS = 32                   # answer length for the neutral prompts: "changed within the first 32 tokens"
LOSS_ROWS = 200                     # held-out rows scored teacher-forced at most

# Every threshold the verdict and the health warnings use, in one place.
THRESHOLDS = {
    "no_effect_update_norm": 1e-4,  # largest ||BA|| / ||W|| of any module below this: the adapter changes nothing
    "no_effect_task_kl": 1e-5,      # mean KL(base || adapter) on the task rows below this (nats/token): same
    "learned_loss_drop": 0.10,      # adapter's held-out loss at least 10% below the base's: learned
    "learned_accuracy_gain": 0.20,  # checker accuracy up by at least 20 points, or ...
    "learned_accuracy": 0.90,       # ... at least 90%: learned
    "learned_reward_gain": 0.10,    # GRPO: mean reward up by 0.10 per unit of total reward weight: learned
    "drift_small_kl": 0.10,         # neutral-prompt KL (nats/token) below this: side effects small
    "drift_large_kl": 0.50,         # at or above this: large (between: moderate)
    "drift_large_changed": 0.50,    # more than half the neutral answers changed: large, whatever the KL
    "overfit_rise": 0.10,           # final eval loss 10% above its minimum: overfitting
    "spike_ratio": 3.0,             # a logged loss 3x the median of the 10 before it: a spike
}


# ---------------------------------------------------------------- files: where, fresh or stale, atomic

def report_file(run_dir: Path, checkpoint: int | None = None) -> Path:
    return Path(run_dir) / FILE if checkpoint is None else Path(run_dir) / "reports" / f"checkpoint-{int(checkpoint)}.json"


def adapter_stamp(run_dir: Path, checkpoint: int | None = None) -> int:
    """The adapter weights' modification time (ns): a report made before it is stale."""
    weights = runs.adapter_path(run_dir, checkpoint) / "adapter_model.safetensors"
    if not weights.is_file():
        raise RunError(f"run {Path(run_dir).name} has no adapter weights ({weights.name} is missing)",
                       "train the run to the end, or pick a checkpoint with --checkpoint N")
    return weights.stat().st_mtime_ns


def load(run_dir: Path, checkpoint: int | None = None) -> dict | None:
    """The saved report if it is fresh (made from the adapter as it is now), else None."""
    path = report_file(run_dir, checkpoint)
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    if rep.get("version") != VERSION or rep.get("adapter_stamp") != adapter_stamp(run_dir, checkpoint):
        return None
    return rep


def failed(run_dir: Path, checkpoint: int | None = None) -> dict | None:
    """The error a failed attempt left in report.json ({kind, message, hint}), or None."""
    try:
        rep = json.loads(report_file(run_dir, checkpoint).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return rep.get("error") if isinstance(rep, dict) else None


def being_written(run_dir: Path) -> bool:
    """Is the training child writing this run's final report right now?"""
    try:
        pid = int((Path(run_dir) / PENDING).read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    return procs.is_alive(pid, None)


def get(run: str, checkpoint: int | None = None, session: ChatSession | None = None, progress=None,
        wait_s: float = 180, user_code: bool = True) -> dict:
    """The fresh report of a run (or checkpoint), made now if there is none or it is stale. Where the training
    child is still writing it, wait for that one (up to wait_s) instead of making a second. user_code: see make."""
    run_dir = run_files.resolve_run(run)
    runs.adapter_path(run_dir, checkpoint)   # a clear message when there is no such adapter
    say = progress or (lambda message, done=None, total=None: None)
    t0 = time.monotonic()
    while checkpoint is None and being_written(run_dir) and time.monotonic() - t0 < wait_s:
        say("The training process is writing the report", None, None)
        time.sleep(1)
    return load(run_dir, checkpoint) or make(run_dir.name, checkpoint, session, progress, user_code=user_code)


# ---------------------------------------------------------------- making one

def make(run: str, checkpoint: int | None = None, session: ChatSession | None = None, progress=None,
         inside_run: bool = False, user_code: bool = True) -> dict:
    """Compute the report of a run's final adapter (or checkpoint N), write it atomically, return it.
    `progress(message, done, total)`; `inside_run`: called by the run's own training child; user_code=False (the
    app): a GRPO run's reward file is left out of the task part, which says so."""
    say = progress or (lambda message, done=None, total=None: None)
    t0 = time.perf_counter()
    run_dir = run_files.resolve_run(run)
    stamp = adapter_stamp(run_dir, checkpoint)
    cfg = runs.load_config(run_dir)
    session = session or ChatSession()
    if inside_run:
        session.inside_run = run_dir.name
    say("Loading the base model and the adapter", None, None)
    name = session.load_run(run_dir.name, checkpoint)
    events, _ = ev.read(run_dir)

    rep = {"version": VERSION, "run": run_dir.name, "checkpoint": checkpoint, "adapter_stamp": stamp,
           "base_model": cfg.model.source, "dataset": cfg.data.source, "device": session.device,
           "created_at": runs.now(), "thresholds": THRESHOLDS}
    try:
        rep["task"] = task(session, name, cfg, say, user_code)
    except GarageError as e:  # a moved dataset: the rest of the report still stands, the task part says why
        rep["task"] = {"error": e.to_dict()}
    rep["drift"] = drift(session, name, say)
    rep["health"] = health(session, name, run_dir, events, rep["task"])
    rep["verdict"] = verdict(rep)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    write(run_dir, checkpoint, rep)
    say("Report written", 1, 1)
    return rep


def write(run_dir: Path, checkpoint: int | None, rep: dict) -> None:
    path = report_file(run_dir, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(path, json.dumps(rep, indent=1, allow_nan=False) + "\n")


def announce(run_dir: Path) -> bool:
    """The training child, before it marks the run ended: "a report is coming" (report.pending, its pid), so the
    app and the CLI wait for it instead of making a second. False when there is no adapter to report on."""
    if not run_files.has_adapter(Path(run_dir)):
        return False
    try:
        (Path(run_dir) / PENDING).write_text(str(os.getpid()))
    except OSError as e:  # the marker only spares a second maker; the report itself is still worth making
        print(f"warning: could not write {PENDING}: {e}", file=sys.stderr, flush=True)
    return True


class ReportStopped(BaseException):
    """A stop signal (SIGTERM, Ctrl-C, CTRL_BREAK) while the training child writes the end-of-run report. A
    BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way holds the report going."""


def _stop_on_signals() -> dict:
    """From now on the stop signals end the report at once (ReportStopped), instead of the training's handler
    that waits for a step that will never come. Only the main thread can set handlers: elsewhere nothing changes.
    Returns the handlers replaced: make_at_run_end puts them back when the report ends."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handle(signum, frame):
        raise ReportStopped(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handle) for sig in
            (getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGBREAK") if hasattr(signal, name))}


def make_at_run_end(run_dir: Path) -> dict | None:
    """The training child's last step after it saved the adapter: make report.json. Any failure is written into
    report.json ({"error": ...}) and events.jsonl as a warning, with the traceback in train.log; the run stays
    completed (or stopped): its adapter is fine, only its report is missing. A stop signal meanwhile ends the
    report within a moment (one decoding step or forward pass), recorded the same way, and the child exits."""
    run_dir = Path(run_dir)
    pending = run_dir / PENDING
    if not announce(run_dir):
        return None
    log = ev.EventLog(run_dir)
    replaced = _stop_on_signals()
    hint = f"the adapter is saved and usable; make the report again with: python -m core report {run_dir.name}"
    try:
        def say(message, done=None, total=None):
            print(f"report: {message}" + (f" {done}/{total}" if total else ""), flush=True)

        rep = make(run_dir.name, None, progress=say, inside_run=True)
        log.log("info", f"report: {rep['verdict']['text']}")
        return rep
    except ReportStopped as e:
        _record_failure(run_dir, log, {"kind": "stopped", "hint": hint,
                                       "message": f"stopped by {e} before it was finished"})
        return None
    except Exception as e:  # noqa: BLE001 - recorded in report.json, events.jsonl and train.log, never hidden
        traceback.print_exc()
        _record_failure(run_dir, log, e.to_dict() if isinstance(e, GarageError) else {
            "kind": type(e).__name__, "message": f"{type(e).__name__}: {e}",
            "hint": f"{hint} (train.log has the traceback)"})
        return None
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
        log.close()
        pending.unlink(missing_ok=True)


def _record_failure(run_dir: Path, log: ev.EventLog, err: dict) -> None:
    """A report that could not be made: report.json holds the error, events.jsonl a warning, stderr the line."""
    write(run_dir, None, {"version": VERSION, "run": run_dir.name, "checkpoint": None, "error": err,
                          "adapter_stamp": None, "created_at": runs.now()})
    text = f"the report could not be made: {err['message']}"
    log.log("warning", text, hint=err.get("hint"))
    print(f"report: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- task: did it learn what the data teaches?

def task(session: ChatSession, name: str, cfg, say, user_code: bool = True) -> dict:
    if cfg.train.objective == "grpo":
        return reward_task(session, name, cfg, say, user_code)
    items = data.demo_eval_set(cfg.data.source)
    out: dict = {}
    if cfg.train.objective != "sft":
        out["loss_note"] = f"no held-out loss for a {cfg.train.objective} run (its rows are preference pairs)"
        rows, split = [], None
    elif items:
        rows = [demo_row(session, it) for it in items if it.get("reply")]
        split = "the demo's held-out prompts with reference replies (shipped with it, never trained on)"
    else:
        prepared = data.prepare(cfg, session.tokenizer, progress=lambda d, t: say("Reading the dataset", d, t))
        train = prepared.train.rows if isinstance(prepared.train, PackedRows) else prepared.train
        rows = [(list(r["input_ids"]), list(r["labels"])) for r in (prepared.eval or train)[:LOSS_ROWS]]
        split = ("eval split" if prepared.eval else
                 "training rows: the run held none out (set data.val_fraction or data.val_source for a held-out loss)")
    if rows:
        scored = session.forced_compare(rows, name, progress=lambda d, t: say("Held-out loss: base and adapter", d, t))
        n = sum(s["n"] for s in scored) or 1
        base, ad = (sum(s[k] for s in scored) / n for k in ("base", "adapter"))
        out["loss"] = {"split": split, "held_out": not split.startswith("training rows"), "rows": len(rows),
                       "tokens": n, "base": base, "adapter": ad, "base_ppl": _exp(base), "adapter_ppl": _exp(ad),
                       "kl": sum(s["kl"] for s in scored) / n}
    # answers side by side: the demo's prompts, else the first rows' prompts with the data's reply
    if items:
        prompts = [(session.encode(it["messages"], GenSettings()), message_text(it["messages"][-1]["content"]),
                    it.get("reply") or it["expected"], it["expected"]) for it in items[:ANSWERS]]
    else:
        prompts = [split_row(session, r) for r in rows[:ANSWERS]]
    if prompts:
        ids = [p[0] for p in prompts]
        step = lambda d, t: say("Answering held-out prompts: base and adapter", d, t)  # noqa: E731
        base, adapted = session.answer_pairs(ids, name, ANSWER_TOKENS, progress=step)
        answers = []
        for (_, prompt, reference, expected), b, a in zip(prompts, base, adapted):
            row = {"prompt": prompt, "reference": reference, "base": b, "adapter": a,
                   "rouge_base": rouge_l(b, reference), "rouge_adapter": rouge_l(a, reference)}
            if items:
                row["expected"] = expected
                row["base_ok"] = bool(data.score_answer(cfg.data.source, b, expected))
                row["adapter_ok"] = bool(data.score_answer(cfg.data.source, a, expected))
            answers.append(row)
        out["answers"] = answers
        out["rouge_l"] = {side: sum(r[f"rouge_{side}"] for r in answers) / len(answers) for side in ("base", "adapter")}
        if items:
            out["checker"] = {"n": len(answers), "base": sum(r["base_ok"] for r in answers) / len(answers),
                              "adapter": sum(r["adapter_ok"] for r in answers) / len(answers)}
    return out


def reward_task(session: ChatSession, name: str, cfg, say, user_code: bool) -> dict:
    """A GRPO run's task: its own rewards on held-out prompts (core.evaluate.reward_scores), base vs adapter, and
    the answers side by side with their rewards (a GRPO file has no reply to compare with)."""
    r = reward_scores(session, name, cfg, ANSWERS, say, user_code)
    answers = [{"prompt": x["prompt"], "reference": "", "base": x["base"], "adapter": x["adapter"],
                "base_reward": x["base_reward"], "adapter_reward": x["adapter_reward"]} for x in r["rows"]]
    return {"rewards": {k: r[k] for k in ("split", "n", "base", "adapter", "above_zero", "rewards", "weights", "note")},
            "answers": answers}


def demo_row(session: ChatSession, item: dict) -> tuple[list[int], list[int]]:
    """A demo prompt with its reference reply as a scored row: the prompt as chat renders it, then the reply and
    the template's end of turn, only those scored."""
    prompt = session.encode(item["messages"], GenSettings())
    msgs = [{"role": m["role"], "content": message_text(m["content"])} for m in item["messages"]]
    msgs.append({"role": "assistant", "content": item["reply"]})
    full = session.tokenizer(session.renderer.render(msgs), add_special_tokens=False)["input_ids"]
    if full[:len(prompt)] != prompt:  # a template whose prompt is not a prefix of the conversation: reply alone
        full = prompt + session.tokenizer(item["reply"], add_special_tokens=False)["input_ids"]
    return full, [-100] * len(prompt) + full[len(prompt):]


def split_row(session: ChatSession, row: tuple[list[int], list[int]]) -> tuple[list[int], str, str, str]:
    """(prompt ids, prompt text, reference reply, "") of a tokenised row: the prompt is everything before its first
    trained token, the reference the trained tokens that follow in one stretch."""
    ids, labels = row
    start = next((i for i, lab in enumerate(labels) if lab != -100), len(ids))
    end = next((i for i in range(start, len(ids)) if labels[i] == -100), len(ids))
    decode = lambda t: session.tokenizer.decode(t, skip_special_tokens=True).strip()  # noqa: E731
    return ids[:start], decode(ids[:start])[-300:], decode(ids[start:end]), ""


# ---------------------------------------------------------------- drift: what did it change outside its task?

def neutral_prompts() -> list[str]:
    lines = NEUTRAL_PROMPTS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def drift(session: ChatSession, name: str, say) -> dict:
    out = {"with_run_system": drift_pass(session, name, say)} if session.run_system else {}
    saved, session.run_system = session.run_system, ""
    try:
        out["plain"] = drift_pass(session, name, say)
    finally:
        session.run_system = saved
    main = out.get("with_run_system") or out["plain"]
    return {**main, "system_prompt": bool(saved), "passes": out}


def drift_pass(session: ChatSession, name: str, say) -> dict:
    questions = neutral_prompts()
    ids = [session.encode([{"role": "user", "content": q}], GenSettings()) for q in questions]
    step = lambda d, t: say("Neutral prompts: base and adapter answer", d, t)  # noqa: E731
    base, adapted = session.answer_pairs(ids, name, DRIFT_TOKENS, progress=step, with_ids=True)
    rows = [(p + b_ids, [-100] * len(p) + b_ids) for p, (_, b_ids) in zip(ids, base) if b_ids]
    scored = session.forced_compare(rows, name, progress=lambda d, t: say("Neutral prompts: KL(base || adapter)", d, t))
    kls, k = [], 0
    for _, b_ids in base:
        kls.append(scored[k]["kl"] / max(scored[k]["n"], 1) if b_ids else 0.0)
        k += bool(b_ids)
    n_tokens = sum(s["n"] for s in scored) or 1
    changed = [i for i, ((b, _), (a, _)) in enumerate(zip(base, adapted)) if b != a]
    top = sorted(changed, key=lambda i: -kls[i])[:3]
    return {"prompts": len(questions), "kl": sum(s["kl"] for s in scored) / n_tokens, "changed": len(changed),
            "changed_share": len(changed) / len(questions), "tokens": DRIFT_TOKENS,
            "most_changed": [{"prompt": questions[i], "base": base[i][0], "adapter": adapted[i][0], "kl": kls[i]}
                             for i in top]}


# ---------------------------------------------------------------- health

def health(session: ChatSession, name: str, run_dir: Path, events: list[dict], task_part: dict) -> dict:
    norms = update_norms(session, name)
    ratios = [m["ratio"] for m in norms if m["ratio"] is not None]
    largest = max(ratios) if ratios else None
    task_kl = (task_part.get("loss") or {}).get("kl")
    t = THRESHOLDS
    why = []
    if largest is not None and largest < t["no_effect_update_norm"]:
        why.append(f"the largest update is {largest:.1e} of its weight (||BA|| / ||W||)")
    if task_kl is not None and task_kl < t["no_effect_task_kl"]:
        why.append(f"on the task rows the adapter's predictions differ from the base's by {task_kl:.1e} nats/token")
    no_effect = {"flag": bool(why), "why": "; ".join(why),
                 "fix": "raise train.lr (LoRA usually trains at 1e-4 to 2e-4; the cpu-demo uses 1e-3), train more "
                        "steps, and check that lora.targets names layers of this model" if why else ""}
    return {"update_norm": {"max": largest, "median": _median(ratios), "modules": norms}, "no_effect": no_effect,
            "overfitting": overfitting(run_dir, events), "divergence": divergence(events)}


def update_norms(session: ChatSession, name: str) -> list[dict]:
    """||scale * B @ A||_F / ||W||_F for every module the adapter changes (None where W is quantized)."""
    import torch  # heavy
    from peft.tuners.lora import LoraLayer  # heavy

    out = []
    with torch.inference_mode():
        for mod_name, mod in (session.model or session.base).named_modules():
            if not isinstance(mod, LoraLayer) or name not in getattr(mod, "lora_A", {}):
                continue
            a, b = mod.lora_A[name].weight.float(), mod.lora_B[name].weight.float()
            delta = float(torch.linalg.matrix_norm(b @ a)) * float(mod.scaling[name])
            w = mod.get_base_layer().weight
            dense = w.dtype.is_floating_point and w.dim() == 2 and tuple(w.shape) in ((b.shape[0], a.shape[1]),
                                                                                   (a.shape[1], b.shape[0]))
            norm = float(torch.linalg.matrix_norm(w.float())) if dense else None
            out.append({"module": mod_name.removeprefix("base_model.model."), "update": delta,
                        "ratio": delta / norm if norm else None})
    return out


def overfitting(run_dir: Path, events: list[dict]) -> dict:
    """The eval-loss history: its minimum against its last value, and the kept checkpoint with the best eval loss.
    `better_checkpoint` is that checkpoint where its eval loss is below the last one (the adapter at the end is
    worse than it): the app then offers "Report at checkpoint N" and "Export checkpoint N"."""
    history = [(e[ev.STEP], e[ev.EVAL_LOSS]) for e in ev.of_type(events, ev.EVAL)
               if isinstance(e.get(ev.EVAL_LOSS), (int, float)) and math.isfinite(e[ev.EVAL_LOSS])]
    if not history:
        return {"flag": False, "evals": 0, "best_checkpoint": None, "better_checkpoint": None, "summary": "",
                "note": "no eval loss was logged (the run has no eval split)"}
    best_step, best = min(history, key=lambda p: p[1])
    final_step, final = history[-1]
    kept = {runs.checkpoint_step(p) for p in runs.checkpoints(run_dir)}
    at_kept = [(s, loss) for s, loss in history if s in kept]
    ck_step, ck_loss = min(at_kept, key=lambda p: p[1]) if at_kept else (None, None)
    better = ck_step if ck_step is not None and ck_step != final_step and ck_loss < final else None
    flag = final > best * (1 + THRESHOLDS["overfit_rise"]) and best_step != final_step
    summary = f"eval loss lowest {best:.3f} at step {best_step}, last {final:.3f} at step {final_step}"
    summary += (f"; best kept checkpoint: {ck_step} (eval loss {ck_loss:.3f})" if ck_step is not None
                else "; no checkpoint was kept at an evaluated step")
    return {"flag": flag, "evals": len(history), "best_step": best_step, "best_eval_loss": best,
            "final_step": final_step, "final_eval_loss": final, "best_checkpoint": ck_step,
            "best_checkpoint_eval_loss": ck_loss, "better_checkpoint": better, "summary": summary,
            "note": (f"eval loss rose from {best:.3f} at step {best_step} to {final:.3f} at step {final_step}"
                     + ("" if best_step in kept else " (no checkpoint of that step was kept)")) if flag else ""}


def divergence(events: list[dict]) -> dict:
    losses = [(m[ev.STEP], m.get(ev.LOSS)) for m in ev.metrics(events)]
    nan = [s for s, loss in losses if not (isinstance(loss, (int, float)) and math.isfinite(loss))]
    skipped = sum("update skipped" in str(e.get(ev.MESSAGE, "")) for e in ev.logs(events))
    finite = [(s, loss) for s, loss in losses if s not in nan]
    spikes = []
    for k in range(5, len(finite)):
        before = _median([loss for _, loss in finite[max(0, k - 10):k]])
        if before and finite[k][1] > THRESHOLDS["spike_ratio"] * before:
            spikes.append(finite[k][0])
    return {"flag": bool(nan or skipped or spikes), "nan_skips": max(len(nan), skipped), "spikes": spikes}


# ---------------------------------------------------------------- the verdict

def verdict(rep: dict) -> dict:
    t, task_part, health_part, d = THRESHOLDS, rep.get("task") or {}, rep["health"], rep["drift"]
    loss, checker, rw = task_part.get("loss"), task_part.get("checker"), task_part.get("rewards")
    parts = []
    if task_part.get("error"):
        state = "unknown"
        parts.append(f"Task not scored: {task_part['error']['message']}")
    elif health_part["no_effect"]["flag"]:
        state = "no effect"
        parts.append(f"No effect: {health_part['no_effect']['why']}. Likely fix: {health_part['no_effect']['fix']}")
    else:
        gains = []
        if checker:
            gains.append(checker["adapter"] >= min(t["learned_accuracy"], checker["base"] + t["learned_accuracy_gain"])
                         and checker["adapter"] > checker["base"])
        if loss:
            gains.append(loss["adapter"] <= loss["base"] * (1 - t["learned_loss_drop"]))
        if rw:
            gains.append(rw["adapter"] >= rw["base"] + t["learned_reward_gain"] * sum(map(abs, rw["weights"].values())))
        worse = ((checker and checker["adapter"] < checker["base"]) or (loss and loss["adapter"] > loss["base"])
                 or (rw and rw["adapter"] < rw["base"]))
        state = ("learned" if gains and all(gains) else "worse" if worse else "unclear")
        facts = []
        if loss:
            facts.append(f"{'held-out' if loss['held_out'] else 'training-row'} loss {loss['base']:.2f} -> "
                         f"{loss['adapter']:.2f}")
        if checker:
            n = checker["n"]
            facts.append(f"answers match the data's {round(checker['adapter'] * n)}/{n} "
                         f"(base {round(checker['base'] * n)}/{n})")
        if rw:
            facts.append(f"mean reward {rw['base']:.2f} -> {rw['adapter']:.2f} on {rw['n']} prompts; "
                         + ", ".join(f"{k} full marks {v['base']['full']:.0%} -> {v['adapter']['full']:.0%}"
                                     for k, v in rw["rewards"].items()))
        parts.append({"learned": "Learned", "worse": "Worse than the base", "unclear": "Unclear"}[state]
                     + (": " + "; ".join(facts) if facts else "") + ".")
    size = ("large" if d["kl"] >= t["drift_large_kl"] or d["changed_share"] > t["drift_large_changed"]
            else "small" if d["kl"] < t["drift_small_kl"] else "moderate")
    parts.append(f"Side effects {size}: KL {d['kl']:.3f} nats/token on {d['prompts']} neutral prompts, "
                 f"{d['changed']}/{d['prompts']} answers changed.")
    of, dv = health_part["overfitting"], health_part["divergence"]
    if of["flag"]:
        best = (f"; checkpoint {of['better_checkpoint']} has the best eval loss of those kept"
                if of["better_checkpoint"] is not None else "")
        parts.append(f"Overfitting: {of['note']}{best}.")
    if dv["flag"]:
        parts.append(f"Unsteady training: {dv['nan_skips']} NaN steps skipped, loss spikes at steps "
                     f"{', '.join(map(str, dv['spikes'])) or 'none'}.")
    return {"task": state, "side_effects": size, "text": " ".join(parts)}


# ---------------------------------------------------------------- the report as text lines

def outline(rep: dict) -> list[str]:
    """The report as plain text lines, verdict first, then the numbers behind it: what `python -m core report`
    prints and what the app shows under "The numbers behind it" (one source for both)."""
    if rep.get("error"):
        e = rep["error"]
        return [f"Report of {rep['run']} could not be made: {e['message']}"] + ([f"Fix: {e['hint']}"] if e.get("hint") else [])
    which = f"checkpoint {rep['checkpoint']}" if rep.get("checkpoint") is not None else "final adapter"
    out = [f"Report: {rep['run']} ({which}) on {rep['base_model']}, made in {rep['seconds']} s on {rep['device']}",
           "", rep["verdict"]["text"], "", "Task"]
    task_part = rep["task"]
    if task_part.get("error"):
        out.append(f"  not scored: {task_part['error']['message']}")
        if task_part["error"].get("hint"):
            out.append(f"  fix: {task_part['error']['hint']}")
    if task_part.get("loss_note"):
        out.append(f"  {task_part['loss_note']}")
    if task_part.get("loss"):
        lo = task_part["loss"]
        out.append(f"  loss on {lo['rows']} rows ({lo['split']}): base {lo['base']:.3f} (perplexity "
                   f"{lo['base_ppl']:.1f}) -> adapter {lo['adapter']:.3f} ({lo['adapter_ppl']:.1f}); "
                   f"KL {lo['kl']:.3f} nats/token")
    if task_part.get("checker"):
        c = task_part["checker"]
        out.append(f"  the dataset's checker on {c['n']} held-out prompts: base {c['base']:.0%} -> "
                   f"adapter {c['adapter']:.0%}")
    if task_part.get("rewards"):
        rw = task_part["rewards"]
        out.append(f"  the run's rewards on {rw['n']} prompts ({rw['split']}): mean total base {rw['base']:.3f} -> "
                   f"adapter {rw['adapter']:.3f}; above zero {rw['above_zero']['base']:.0%} -> "
                   f"{rw['above_zero']['adapter']:.0%}")
        for k, v in rw["rewards"].items():
            out.append(f"    {k} x{rw['weights'][k]:g}: mean {v['base']['mean']:.3f} -> {v['adapter']['mean']:.3f}, "
                       f"full marks {v['base']['full']:.0%} -> {v['adapter']['full']:.0%}")
        if rw["note"]:
            out.append(f"  note: {rw['note']}")
    if task_part.get("rouge_l"):
        r = task_part["rouge_l"]
        out.append(f"  ROUGE-L to the data's reply: base {r['base']:.2f} -> adapter {r['adapter']:.2f}")
    answers = task_part.get("answers", [])
    if answers:
        out += ["", f"Answers to {len(answers)} held-out prompts"]
    for a in answers:
        if "base_reward" in a:  # a GRPO run: no reply in the data, each answer with its reward
            out += [f"  ? {_one_line(a['prompt'])}", f"      base    [{a['base_reward']:.2f}]: {_said(a['base'])}",
                    f"      adapter [{a['adapter_reward']:.2f}]: {_said(a['adapter'])}"]
            continue
        mark = lambda side: "" if f"{side}_ok" not in a else (" (right)" if a[f"{side}_ok"] else " (wrong)")  # noqa: E731
        out += [f"  ? {_one_line(a['prompt'])}", f"      data:    {_said(a['reference'])}",
                f"      base:    {_said(a['base'])}{mark('base')}", f"      adapter: {_said(a['adapter'])}{mark('adapter')}"]
    d = rep["drift"]
    out += ["", f"Drift: {d['prompts']} neutral prompts, answers of {d['tokens']} tokens",
            f"  KL(base || adapter) {d['kl']:.4f} nats/token; {d['changed']}/{d['prompts']} answers changed"]
    if d.get("system_prompt"):
        for key, label in (("with_run_system", "with"), ("plain", "without")):
            p = d["passes"][key]
            out.append(f"  {label} the run's system prompt: KL {p['kl']:.4f}, {p['changed']}/{p['prompts']} changed")
    if d["most_changed"]:
        out.append("  most changed:")
    for m in d["most_changed"]:
        out += [f"  ? {_one_line(m['prompt'])} (KL {m['kl']:.3f})", f"      base:    {_said(m['base'])}",
                f"      adapter: {_said(m['adapter'])}"]
    h = rep["health"]
    un, of, dv = h["update_norm"], h["overfitting"], h["divergence"]
    out += ["", "Health"]
    if un["max"] is not None:
        out.append(f"  update size ||BA|| / ||W||: median {un['median']:.2e}, largest {un['max']:.2e} "
                   f"over {len(un['modules'])} modules")
    out.append(f"  no effect: {h['no_effect']['why'] or 'no'}")
    if h["no_effect"].get("fix"):
        out.append(f"    likely fix: {h['no_effect']['fix']}")
    out.append(f"  overfitting: {of['note'] or 'no'}")
    if of.get("summary"):
        out.append(f"    {of['summary']}")
    if of.get("better_checkpoint") is not None and rep.get("checkpoint") is None:  # pointed to from the final's only
        n = of["better_checkpoint"]
        out += [f"    checkpoint {n} is better than the final adapter:",
                f"      python -m core report {rep['run']} --checkpoint {n}",
                f"      python -m core export {rep['run']} --checkpoint {n} --zip {rep['run']}-checkpoint-{n}.zip"]
    out.append(f"  divergence: {dv['nan_skips']} NaN steps skipped, {len(dv['spikes'])} loss spikes"
               + (f" (at steps {', '.join(map(str, dv['spikes']))})" if dv["spikes"] else ""))
    return out


def _one_line(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


def _said(text: str) -> str:
    """An answer on one line, quoted so that an empty one and surrounding spaces show."""
    return repr(_one_line(text)) if text.strip() else "(empty)"


# ---------------------------------------------------------------- small helpers

def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (longest common subsequence), 0..1."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def _exp(x: float) -> float:
    return math.exp(min(x, 700))


def _median(xs: list[float]) -> float | None:
    s = sorted(xs)
    return (s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2) if s else None

