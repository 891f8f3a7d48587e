"""The event schema of a run's events.jsonl: every event type and field name, with its unit, and the one writer
(the training child) and reader (the UI, the CLI, the ETA). No other module spells an event field name: they
import these constants and helpers, so a renamed field breaks loudly in one place instead of emptying a chart.

One JSON object per line, flushed per line; "t" (unix seconds) on every event.

    metrics  step, epoch, loss, lr, grad_norm, tokens_per_s (non-padding tokens / s), elapsed (s since the run's
             first step in this process), eta_s (s), mfu (fraction, CUDA only), mem {...} (bytes, see MEM_*)
             + for DPO / ORPO: reward_chosen, reward_rejected, reward_margin (nats), pref_accuracy (fraction)
    eval     step, eval_loss (+ the same preference fields, on the held-out pairs)
             + for GRPO: reward, reward_std (the weighted total over the step's completions), rewards {function
             name: mean}, completion_len (tokens, mean), clipped_ratio (share cut at grpo_max_completion),
             kl (nats/token, when grpo_beta > 0), entropy (nats/token), zero_std_ratio (share of groups whose
             completions all scored the same: they teach nothing)
    sample   step, prompt, text
    completions  GRPO, at each checkpoint: step, items [{prompt, completion, rewards {name: value}, reward}]
    log      level (info|warning|error), message, hint (errors), topic (TOPIC_* for notes a page shows apart)
    data     the dataset's stats at start (core.data.sft.DataStats.to_dict: format, rows, tokens, ...)
    resume   step (metrics after it, logged before a crash or stop, are superseded)
    startup  one per start-up phase of the child, in order, written as it ends: phase (STARTUP_PHASES), start
             (unix s), duration_s (s, wall clock), cpu_s (s of CPU the child's threads spent in it: on a loaded machine
             wall time stretches, CPU time much less), detail (text: what the phase did, e.g. "from the cache").
             Back to back: each
             phase starts where the one before ended, so their sum is the time from spawn to the first metrics
             event (core.train.startup writes them; startup_timeline reads them)
    recovered  step (the last completed optimizer step the run carries on from), at_step (the step that ran out
             of memory), what (REMEDY_*), why (the error's first line), message (what a person reads), mem_before
             (bytes: torch's peak reserved on CUDA, the process RSS on the CPU), batch_size, grad_accum,
             grad_checkpointing, max_len (the settings after the change), rows_cut (training rows longer than
             max_len, cut or dropped: counted at every recovery), from_checkpoint (the checkpoint resumed, or null
             for a restart at step 0)

Memory ("mem"), in bytes. "Peak" means what a user sees: the whole process on the GPU as the driver counts it
(NVML, what nvidia-smi shows: CUDA context + allocator cache + tensors), never less than torch's own peak reserved
plus the context measured at start, since NVML is only sampled. torch's peak reserved / allocated sit beside it.
On the CPU: the process's resident set size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

FILE = "events.jsonl"

# event types
TYPE, T = "type", "t"
METRICS, EVAL, SAMPLE, LOG, DATA, RESUME = "metrics", "eval", "sample", "log", "data", "resume"
RECOVERED = "recovered"
COMPLETIONS = "completions"
STARTUP = "startup"

# metrics fields
STEP, EPOCH, LOSS, LR, GRAD_NORM = "step", "epoch", "loss", "lr", "grad_norm"
TOKENS_PER_S, ELAPSED, ETA_S, MFU, MEM = "tokens_per_s", "elapsed", "eta_s", "mfu", "mem"
EVAL_LOSS = "eval_loss"
# preference tuning (DPO / ORPO), in metrics and eval events. Rewards are TRL's implicit rewards in nats
# (DPO: beta * log-ratio to the reference; ORPO: beta * log-probability), margin = chosen - rejected,
# accuracy = share of pairs whose chosen reward is higher.
REWARD_CHOSEN, REWARD_REJECTED = "reward_chosen", "reward_rejected"
REWARD_MARGIN, PREF_ACCURACY = "reward_margin", "pref_accuracy"
PREFERENCE_FIELDS = (REWARD_CHOSEN, REWARD_REJECTED, REWARD_MARGIN, PREF_ACCURACY)
# GRPO (core.train.grpo), in metrics events: rewards are the reward functions' own units (core.train.rewards)
REWARD, REWARD_STD, REWARDS = "reward", "reward_std", "rewards"
COMPLETION_LEN, CLIPPED_RATIO, KL, ENTROPY, ZERO_STD_RATIO = ("completion_len", "clipped_ratio", "kl", "entropy",
                                                              "zero_std_ratio")
GRPO_FIELDS = (REWARD, REWARD_STD, REWARDS, COMPLETION_LEN, CLIPPED_RATIO, KL, ENTROPY, ZERO_STD_RATIO)
ITEMS, COMPLETION = "items", "completion"
PROMPT, TEXT = "prompt", "text"
LEVEL, MESSAGE, HINT, TOPIC = "level", "message", "hint", "topic"
# recovered fields (core.train.recovery)
AT_STEP, WHAT, WHY, MEM_BEFORE = "at_step", "what", "why", "mem_before"
BATCH_SIZE, GRAD_ACCUM, GRAD_CHECKPOINTING, FROM_CHECKPOINT = ("batch_size", "grad_accum", "grad_checkpointing",
                                                               "from_checkpoint")
MAX_LEN, ROWS_CUT = "max_len", "rows_cut"
REMEDY_MICRO_BATCH, REMEDY_CHECKPOINTING, REMEDY_SHORTEN = "micro_batch", "grad_checkpointing", "shorten"
REMEDIES = (REMEDY_MICRO_BATCH, REMEDY_CHECKPOINTING, REMEDY_SHORTEN)
# startup fields: PHASE (one of STARTUP_PHASES), START (unix s), DURATION_S (s), CPU_S (s of CPU), DETAIL (text)
PHASE, START, DURATION_S, CPU_S, DETAIL = "phase", "start", "duration_s", "cpu_s", "detail"
# the child's start-up phases in the order they happen, with what each covers
STARTUP_PHASES = {
    "spawn": "the runner's spawn to the child's Python importing core",
    "imports": "torch, transformers, peft and the child's own modules; the run's config",
    "model files": "finding (converting on first use) the model files, the estimate, the tokenizer",
    "tokenise": "reading and tokenising the dataset, or reading it back from the data cache",
    "model load": "loading the weights and adding LoRA",
    "padding-free check": "checking that flattened rows stay apart on this model, or its cached verdict",
    "trainer build": "the Trainer, its arguments, the loss and the callbacks",
    "first step": "the first optimizer step(s), to the first metrics event",
}

# mem fields (bytes)
MEM_RSS = "rss"                                    # CPU: process resident set size now
MEM_GPU_PEAK = "gpu_peak"                          # CUDA: process total on the GPU, peak so far (see above)
MEM_GPU_PROCESS = "gpu_process"                    # CUDA: process total on the GPU at this step (NVML)
MEM_TORCH_PEAK_RESERVED = "torch_peak_reserved"    # CUDA: torch.cuda.max_memory_reserved()
MEM_TORCH_PEAK_ALLOCATED = "torch_peak_allocated"  # CUDA: torch.cuda.max_memory_allocated()
MEM_TORCH_RESERVED = "torch_reserved"              # CUDA: torch.cuda.memory_reserved() now
MEM_GPU_TOTAL = "gpu_total"                        # CUDA: the card's memory
MEM_NVML_ERROR = "nvml_error"                      # CUDA: why there is no NVML reading (text)
MEM_RANKS = "ranks"                                # several processes: every rank's own mem dict, by rank

# The memory series the pages draw, in order, with their labels. The Runs table's "peak" is the first present.
MEM_SERIES = {MEM_GPU_PEAK: "GPU peak (process, NVML)", MEM_TORCH_PEAK_RESERVED: "torch peak reserved",
              MEM_RSS: "process RSS (CPU)"}

TOPIC_TEMPLATE = "template"  # a log event saying the run trained with the fallback chat template

LEVELS = ("info", "warning", "error")


class EventLog:
    """The child's writer: one JSON object per line, flushed at once so the UI sees it on its next poll."""

    def __init__(self, run_dir: Path):
        self.fh = open(Path(run_dir) / FILE, "a", encoding="utf-8")

    def write(self, event: dict) -> None:
        event.setdefault(T, round(time.time(), 3))
        self.fh.write(json.dumps(event, allow_nan=True) + "\n")
        self.fh.flush()

    def metrics(self, *, step: int, epoch: float, loss, lr, grad_norm, tokens_per_s: float, elapsed: float,
                eta_s: float, mem: dict, mfu: float | None = None, extra: dict | None = None) -> dict:
        """`extra`: the objective's own fields (PREFERENCE_FIELDS, GRPO_FIELDS), checked against the schema."""
        event = {TYPE: METRICS, STEP: step, EPOCH: epoch, LOSS: loss, LR: lr, GRAD_NORM: grad_norm,
                 TOKENS_PER_S: tokens_per_s, ELAPSED: elapsed, ETA_S: eta_s, MEM: mem}
        if mfu is not None:
            event[MFU] = mfu
        event.update(_extra(extra))
        self.write(event)
        return event

    def eval(self, step: int, eval_loss, extra: dict | None = None) -> None:
        self.write({TYPE: EVAL, STEP: step, EVAL_LOSS: eval_loss, **_extra(extra)})

    def sample(self, step: int, prompt: str, text: str) -> None:
        self.write({TYPE: SAMPLE, STEP: step, PROMPT: prompt, TEXT: text})

    def completions(self, step: int, items: list[dict]) -> None:
        """GRPO's sampled completions with their rewards: items of {prompt, completion, rewards, reward}."""
        keys = {PROMPT, COMPLETION, REWARDS, REWARD}
        for item in items:
            if set(item) != keys:
                raise ValueError(f"a completions item has {sorted(item)}, not {sorted(keys)}")
        self.write({TYPE: COMPLETIONS, STEP: step, ITEMS: items})

    def log(self, level: str, message: str, hint: str | None = None, topic: str | None = None) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        event = {TYPE: LOG, LEVEL: level, MESSAGE: message}
        if hint is not None:
            event[HINT] = hint
        if topic is not None:
            event[TOPIC] = topic
        self.write(event)

    def data(self, stats: dict) -> None:
        self.write({TYPE: DATA, **stats})

    def resume(self, step: int) -> None:
        self.write({TYPE: RESUME, STEP: step})

    def recovered(self, *, step: int, at_step: int, what: str, why: str, message: str, mem_before: int | None,
                  batch_size: int, grad_accum: int, grad_checkpointing: bool, max_len: int, rows_cut: int,
                  from_checkpoint: str | None) -> dict:
        if what not in REMEDIES:
            raise ValueError(f"unknown remedy {what!r}")
        event = {TYPE: RECOVERED, STEP: step, AT_STEP: at_step, WHAT: what, WHY: why, MESSAGE: message,
                 MEM_BEFORE: mem_before, BATCH_SIZE: batch_size, GRAD_ACCUM: grad_accum,
                 GRAD_CHECKPOINTING: grad_checkpointing, MAX_LEN: max_len, ROWS_CUT: rows_cut,
                 FROM_CHECKPOINT: from_checkpoint}
        self.write(event)
        return event

    def startup(self, phase: str, start: float, duration_s: float, cpu_s: float | None = None,
                detail: str | None = None) -> dict:
        if phase not in STARTUP_PHASES:
            raise ValueError(f"unknown start-up phase {phase!r} (add it to core.events.STARTUP_PHASES first)")
        event = {TYPE: STARTUP, PHASE: phase, START: round(start, 3), DURATION_S: round(duration_s, 3)}
        if cpu_s is not None:
            event[CPU_S] = round(cpu_s, 3)
        if detail:
            event[DETAIL] = detail
        self.write(event)
        return event

    def close(self) -> None:
        self.fh.close()


class NoEvents(EventLog):
    """What ranks other than 0 write through: nothing (rank 0 alone writes the run folder)."""

    def __init__(self):
        self.fh = None

    def write(self, event: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _extra(extra: dict | None) -> dict:
    unknown = set(extra or {}) - set(PREFERENCE_FIELDS) - set(GRPO_FIELDS)
    if unknown:
        raise ValueError(f"not event fields: {sorted(unknown)} (add them to core.events first)")
    return dict(extra or {})


# ---------------------------------------------------------------- reading

def read(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events appended since byte `offset`, and the offset to pass next time. A line still being written (no
    newline yet) is left for the next call. A corrupt line becomes a warning event instead of vanishing."""
    path = Path(run_dir) / FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            out.append({TYPE: LOG, LEVEL: "warning", MESSAGE: f"unreadable event line ({e}): {line[:200]!r}"})
    return out, offset + end


def metrics(events: list[dict]) -> list[dict]:
    """The metrics events of a run as one curve: after a resume event at step k, the steps after k that were
    logged before the crash or stop are superseded by the resumed run's."""
    out: list[dict] = []
    for e in events:
        if e.get(TYPE) == RESUME:
            out = [m for m in out if m.get(STEP, 0) <= e.get(STEP, 0)]
        elif e.get(TYPE) == METRICS and e.get(STEP) is not None:
            out.append(e)
    return out


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e.get(TYPE) == kind]


def logs(events: list[dict]) -> list[dict]:
    return of_type(events, LOG)


def recoveries(events: list[dict]) -> list[dict]:
    """The run's recoveries from out of memory, oldest first (each says what changed, at which step)."""
    return of_type(events, RECOVERED)


def template_notice(events: list[dict]) -> str | None:
    """The run's fallback-template notice (written by training at start), or None when the model has its own."""
    notes = [e.get(MESSAGE) for e in logs(events) if e.get(TOPIC) == TOPIC_TEMPLATE]
    return notes[-1] if notes else None


def memory_points(events: list[dict]) -> list[tuple[int, str, int]]:
    """(step, mem key, bytes) for every MEM_SERIES value the metrics events carry."""
    out = []
    for e in metrics(events):
        mem = e.get(MEM) or {}
        for key in MEM_SERIES:
            v = mem.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                out.append((e[STEP], key, int(v)))
    return out


def rank_memory_points(events: list[dict]) -> list[tuple[int, int, str, int]]:
    """(step, rank, mem key, bytes) of the ranks other than 0 in a multi-process run (rank 0's are memory_points):
    each rank's first MEM_SERIES value."""
    out = []
    for e in metrics(events):
        for r, mem in enumerate((e.get(MEM) or {}).get(MEM_RANKS) or []):
            if r == 0 or not isinstance(mem, dict):
                continue
            key = next((k for k in MEM_SERIES if isinstance(mem.get(k), (int, float)) and mem[k] > 0), None)
            if key is not None:
                out.append((e[STEP], r, key, int(mem[key])))
    return out


def peak_memory(events: list[dict]) -> tuple[int, str] | None:
    """(bytes, mem key) of the run's measured peak to hold against the estimate: the GPU process peak on CUDA
    (torch's peak reserved where NVML gave nothing), else the largest CPU RSS. None before the first step."""
    best: dict[str, int] = {}
    for _, key, value in memory_points(events):
        best[key] = max(best.get(key, 0), value)
    for key in MEM_SERIES:
        if key in best:
            return best[key], key
    return None


def series(events: list[dict], field: str) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, value)], "eval": [(step, value)]} of a field logged in metrics and eval events."""
    out = {"train": [], "eval": []}
    for name, rows in (("train", metrics(events)), ("eval", of_type(events, EVAL))):
        for e in rows:
            v = e.get(field)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and e.get(STEP) is not None:
                out[name].append((e[STEP], float(v)))
    return out


def last_metric(events: list[dict], field: str):
    """The newest value of a metrics field (None when no metrics event has it)."""
    for e in reversed(metrics(events)):
        if e.get(field) is not None:
            return e[field]
    return None


def startup_timeline(events: list[dict]) -> list[dict]:
    """The run's latest start-up, phase by phase: [{phase, start, duration_s, detail}] in the order they happened.
    A resumed run starts its child again: only the events after the last "spawn" (or the first phase) count."""
    rows: list[dict] = []
    for e in of_type(events, STARTUP):
        if e.get(PHASE) == "spawn" or (rows and rows[-1].get(PHASE) == "first step"):
            rows = []
        rows.append({PHASE: e.get(PHASE), START: e.get(START), DURATION_S: e.get(DURATION_S),
                     CPU_S: e.get(CPU_S), DETAIL: e.get(DETAIL, "")})
    return rows


def format_timeline(rows: list[dict]) -> str:
    """The start-up timeline as a small text table (wall seconds, share of the whole, CPU seconds), or "" when
    there is none."""
    if not rows:
        return ""
    total = sum(float(r[DURATION_S] or 0) for r in rows)
    cpu = sum(float(r.get(CPU_S) or 0) for r in rows)
    width = max(len(str(r[PHASE])) for r in rows)
    lines = [f"{'phase':<{width}}  {'seconds':>8}  {'share':>5}  {'CPU s':>7}  detail"]
    for r in rows:
        s = float(r[DURATION_S] or 0)
        c = f"{r[CPU_S]:7.2f}" if r.get(CPU_S) is not None else f"{'-':>7}"
        lines.append(f"{r[PHASE]:<{width}}  {s:8.2f}  {100 * s / total if total else 0:4.0f}%  {c}  "
                     f"{r[DETAIL] or ''}".rstrip())
    done = rows[-1][PHASE] == "first step"
    lines.append(f"{'total' if done else 'so far':<{width}}  {total:8.2f}  {'':>5}  {cpu:7.2f}  "
                 + ("to the first metrics event" if done else "(the first step has not ended yet)"))
    return "\n".join(lines)
