"""The run folder contract (docs/architecture.md): $LORA_GARAGE_HOME/runs/<run-id>/ with config.yaml, status.json,
events.jsonl, estimate.json, train.log, checkpoints/ and adapter/.

The child process writes these files, everyone else reads them. status.json is replaced atomically (tmp +
os.replace) under a small lock file so the runner and the child never lose each other's fields; events.jsonl is
append-only, one flushed JSON object per line, so a reader can tail it from a byte offset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path

import hashlib
from core.runs import portable
from core.runs import procs
from core.config import RunConfig, dump_yaml, load_yaml
from core.errors import DiskFull, RunError
from core.paths import runs_dir, temp_beside
from core.paths import file_sha256 as sha

STATES = ("queued", "running", "stopping", "stopped", "completed", "failed")
ACTIVE = ("queued", "running", "stopping")      # a process should be alive behind these
TERMINAL = ("stopped", "completed", "failed")
COMPLETE = "COMPLETE"                            # the marker written last into a finished checkpoint
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CKPT_RE = re.compile(r"checkpoint-(\d+)")


# ---------------------------------------------------------------- creating and finding runs

def create(cfg: RunConfig) -> Path:
    """A new run folder holding config.yaml (written once), status.json (queued) and an empty events.jsonl.
    The settings were admitted before (core.runs.runner.admit, the one check every way of starting uses)."""
    base = cfg.output.run_name or _derived_name(cfg)
    root = runs_dir()
    for n in range(1, 1000):
        run_id = base if n == 1 else f"{base}-{n}"
        run_dir = root / run_id
        try:
            run_dir.mkdir()  # atomic: two creators can never get the same folder
        except FileExistsError:
            if cfg.output.run_name and n == 1:
                raise RunError(f"a run named {base!r} already exists",
                               "pick another output.run_name, or leave it empty for an automatic name")
            continue
        break
    else:
        raise RunError(f"too many runs named {base}-N", "delete some old runs")
    header = f"# run {run_id}: the full configuration as resolved at start. Edit a copy, not this file.\n"
    write_atomic(run_dir / "config.yaml", dump_yaml(cfg, header))
    (run_dir / "events.jsonl").touch()
    write_status(run_dir, state="queued", pid=None, started_at=None, ended_at=None, step=0,
                 total_steps=cfg.train.max_steps if cfg.train.max_steps > 0 else None, error=None)
    return run_dir


def _derived_name(cfg: RunConfig) -> str:
    src = cfg.model.source.rstrip("/")
    short = src.split(":", 1)[1] if src.startswith("builtin:") else src.replace("\\", "/").split("/")[-1]
    short = re.sub(r"[^A-Za-z0-9._-]+", "-", short).strip("-._")[:40] or "model"
    return f"{short}-{cfg.quant.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def get(run_id: str) -> Path:
    """The folder of an existing run. Refuses names that could point outside the runs folder."""
    run_id = str(run_id or "").strip()
    if not _ID_RE.fullmatch(run_id) or ".." in run_id:
        raise RunError(f"{run_id!r} is not a valid run id", "run ids use letters, digits, - _ . (see python -m core runs)")
    root = runs_dir().resolve()
    run_dir = (root / run_id).resolve()
    if run_dir.parent != root:  # a symlink pointing elsewhere is refused too
        raise RunError(f"run {run_id!r} resolves outside the runs folder", "use a plain run id")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"no run named {run_id!r}", "list runs with: python -m core runs")
    return run_dir


def list_runs() -> list[dict]:
    """A summary per run, newest first: id, path, state, step, total_steps, times, model, dataset, method, error."""
    out = []
    for run_dir in runs_dir().iterdir():
        if not (run_dir / "config.yaml").is_file():
            continue
        try:
            st = read_status(run_dir)
            cfg = load_config(run_dir)
        except Exception as e:  # noqa: BLE001 - one broken run must not hide the others; it is listed as broken
            out.append({"id": run_dir.name, "path": str(run_dir), "state": "unreadable", "error":
                        {"kind": "run", "message": f"{type(e).__name__}: {e}", "hint": "inspect or delete this folder"},
                        "created": run_dir.stat().st_mtime})
            continue
        out.append({"id": run_dir.name, "path": str(run_dir), "state": st.get("state"), "step": st.get("step"),
                    "total_steps": st.get("total_steps"), "started_at": st.get("started_at"),
                    "ended_at": st.get("ended_at"), "error": st.get("error"), "model": cfg.model.source,
                    "dataset": cfg.data.source, "method": cfg.quant.method,
                    "objective": cfg.train.objective,
                    "has_adapter": (run_dir / "adapter" / "adapter_config.json").is_file(),
                    "created": (run_dir / "config.yaml").stat().st_mtime})
    return sorted(out, key=lambda r: r["created"], reverse=True)


def load_config(run_dir: Path) -> RunConfig:
    return load_yaml(Path(run_dir) / "config.yaml")


def delete(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    get(run_dir.name)  # validates that it is one of ours
    shutil.rmtree(run_dir)


# ---------------------------------------------------------------- status.json

def read_status(run_dir: Path, reconcile: bool = True) -> dict:
    """status.json as a dict. With reconcile, a run that claims to be active but whose process is gone is marked
    failed first (the runner checks the pid), so no reader ever shows a dead run as running."""
    run_dir = Path(run_dir)
    path = run_dir / "status.json"
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{run_dir.name} has no status.json", "the run folder is incomplete; delete it")
    if reconcile and st.get("state") in ACTIVE:
        st = _record_death(run_dir, st)
    return st


def _record_death(run_dir: Path, st: dict) -> dict:
    """A run that claims to be active: if its process is gone (core.runs.procs.check), mark it failed (stopped when a
    stop was asked for) with how it ended and the tail of train.log. Returns the (possibly new) status."""
    death = procs.check(run_dir, st)
    if death is None:
        return st
    kept = latest_checkpoint(run_dir)
    hint = (f"see the end of train.log; resume continues from {kept.name}, the last complete checkpoint" if kept else
            "see the end of train.log; no checkpoint was saved, so the run must start again (Start, same settings)")
    error = {"kind": "crash", "message": f"the training process ended without a word ({death.how})", "hint": hint,
             "exit_code": death.exit_code, "log_tail": tail_log(run_dir, 15)}
    when = {"ended_at": death.ended_at, **({"noticed_at": death.noticed_at} if death.noticed_at else {})}
    # asked to stop and then gone (e.g. SIGTERM before its handler was installed): stopped, with the reason kept
    state = "stopped" if st.get("state") == "stopping" else "failed"
    new = update_status(run_dir, ACTIVE, state=state, error=error, **when)
    return new if new is not None else read_status(run_dir, reconcile=False)


def run_ended(run_id: str) -> bool:
    """Whether the run's status says it is over (stopped / completed / failed), without checking its process."""
    try:
        return read_status(get(run_id), reconcile=False).get("state") in TERMINAL
    except RunError:
        return False


def run_active(run_id: str) -> bool:
    """Whether the run is queued / running / stopping with its process alive or still starting (a status read
    that marks a run whose process died as failed)."""
    try:
        return read_status(get(run_id)).get("state") in ACTIVE
    except RunError:
        return False


def write_status(run_dir: Path, durable: bool = True, **fields) -> dict:
    """Merge `fields` into status.json atomically; returns the new status. durable=False skips the fsync (for
    frequent step counters; a reader still never sees a half-written file)."""
    return update_status(run_dir, None, durable=durable, **fields)


def update_status(run_dir: Path, only_from: tuple | None, durable: bool = True, **fields) -> dict | None:
    """Like write_status, but only when the current state is in `only_from` (None = always). Returns the new
    status, or None when the state did not match. The lock makes read-modify-write safe between processes."""
    run_dir = Path(run_dir)
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"unknown state {fields['state']!r}")
    with portable.locked(run_dir / ".status.lock"):
        path = run_dir / "status.json"
        try:
            st = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            st = {}
        if only_from is not None and st.get("state") not in only_from:
            return None
        if fields.get("started_at") and st.get("started_at"):
            # started_at is the first start, written once; a later start (a resume) is recorded as resumed_at
            fields = dict(fields)
            fields["resumed_at"] = fields.pop("started_at")
        st.update(fields)
        st["updated_at"] = now()
        write_atomic(path, json.dumps(st, indent=1), durable)
        return st


now = procs.now



def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write all of `text` to `path` or leave it as it was (through a temporary file of this writer's own:
    core.paths.temp_beside)."""
    tmp = temp_beside(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- estimate.json, train.log

def estimate_bytes(run_dir: Path) -> int | None:
    """Total bytes of the VRAM estimate written at launch (estimate.json), or None when there is none. Where the
    run measured its CUDA context at start (measured_context_bytes), that replaces the estimate's assumed one:
    held against the measured peak, the difference is then only what the estimator could have known."""
    path = Path(run_dir) / "estimate.json"
    try:
        body = json.loads(path.read_text())
        total = int(body.get("total_bytes") or 0)
        if total and body.get("measured_context_bytes") is not None:
            total += int(body["measured_context_bytes"]) - int((body.get("details") or {}).get("cuda_context", 0))
        return total or None
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:  # a damaged file: the run still shows, without its estimate line
        print(f"warning: unreadable {path}: {e}", file=sys.stderr)
        return None


# Lines of train.log a user need not read: Python warnings raised inside installed libraries (and the source line
# Python prints under each), progress bars drawn with carriage returns, and bitsandbytes' note about optional
# kernels. They stay in the file; only the page's view leaves them out.
_NOISE = re.compile(r"(^\S*site-packages/\S+:\d+: \w*Warning:)|(^\s+warnings\.warn\()|(\d+it/s\]|\|\s*\d+/\d+ \[)"
                    r"|(bitsandbytes.*(compiled without|kernel|CUDA SETUP))", re.IGNORECASE)


def events_size(run_dir: Path) -> int:
    """events.jsonl's size in bytes (0 before it exists)."""
    try:
        return (Path(run_dir) / "events.jsonl").stat().st_size
    except FileNotFoundError:
        return 0


def log_size(run_dir: Path) -> int | None:
    """train.log's size in bytes (None before it exists): a view that shows its tail reads it again when this
    changes."""
    try:
        return (Path(run_dir) / "train.log").stat().st_size
    except FileNotFoundError:
        return None


def tail_log(run_dir: Path, lines: int = 30, hide_noise: bool = False) -> str:
    """The last `lines` lines of train.log; with hide_noise, library warnings and progress bars left out (and
    counted in a last line), so the end of the log is what the run itself said."""
    path = Path(run_dir) / "train.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    kept = text.splitlines()
    if hide_noise:
        noise = [bool(_NOISE.search(line)) for line in kept]
        hidden = sum(noise)
        kept = [line for line, is_noise in zip(kept, noise) if line.strip() and not is_noise]
        out = kept[-lines:]
        if hidden:
            out.append(f"({hidden} lines of library warnings and progress bars not shown: see {path})")
        return "\n".join(out)
    return "\n".join(kept[-lines:])


# ---------------------------------------------------------------- checkpoints and adapters

def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoints(run_dir: Path) -> list[Path]:
    """COMPLETE-marked checkpoints, oldest first. Unmarked folders (a save cut short) are never listed."""
    found = []
    d = checkpoints_dir(run_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = _CKPT_RE.fullmatch(p.name)
            if m and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    marked = checkpoints(run_dir)
    return marked[-1] if marked else None


def checkpoint_step(path: Path) -> int:
    return int(_CKPT_RE.fullmatch(Path(path).name).group(1))


def set_aside_partial(run_dir: Path) -> list[Path]:
    """Rename checkpoint folders without a COMPLETE marker to partial-checkpoint-N[-k]: kept for inspection,
    never loaded, and out of the way of a new save to the same step."""
    moved = []
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return moved
    for p in sorted(d.iterdir()):
        if _CKPT_RE.fullmatch(p.name) and p.is_dir() and not (p / COMPLETE).is_file():
            target = d / f"partial-{p.name}"
            k = 1
            while target.exists():
                k += 1
                target = d / f"partial-{p.name}-{k}"
            os.replace(p, target)
            moved.append(target)
    return moved


def disk_full_error(run_dir: Path, cause: BaseException, phase: str, step: int) -> DiskFull:
    """The disk filled up while the run wrote something: set the cut-short checkpoint aside at once, and say which
    checkpoint is intact and how much space to free (one checkpoint's worth, or what the write needed)."""
    run_dir = Path(run_dir)
    moved = set_aside_partial(run_dir)
    latest = latest_checkpoint(run_dir)
    free_mb = shutil.disk_usage(run_dir).free / 2**20
    need_mb = _size(latest) / 2**20 if latest else 0
    where = f"during {phase}" + (f" at step {step}" if step else "")
    aside = f"; the cut-short save was set aside as {moved[0].name}" if moved else ""
    kept = (f"{latest.name} is intact and resume continues from it" if latest
            else "no complete checkpoint was saved yet")
    amount = f"at least {max(need_mb, 1):,.0f} MB" if latest else "space"
    return DiskFull(f"the disk filled up {where}{aside}; {kept} ({cause})",
                    f"free {amount} on {_mount_point(run_dir)} ({free_mb:,.0f} MB free now), lower "
                    "train.save_total_limit, or point LORA_GARAGE_HOME at a bigger disk")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _mount_point(path: Path) -> str:
    p = Path(path).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def adapter_path(run_dir: Path, checkpoint: int | str | None = None) -> Path:
    """The final adapter/ folder, or a marked checkpoint's (by step number or folder name)."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        path = run_dir / "adapter"
        if not (path / "adapter_config.json").is_file():
            marked = checkpoints(run_dir)
            hint = (f"pick a checkpoint: {', '.join(str(checkpoint_step(p)) for p in marked)}" if marked
                    else "train the run to the end (or stop it: stopping saves the adapter)")
            raise RunError(f"run {run_dir.name} has no final adapter", hint)
        return path
    name = checkpoint if isinstance(checkpoint, str) and checkpoint.startswith("checkpoint-") else f"checkpoint-{int(checkpoint)}"
    path = checkpoints_dir(run_dir) / name
    if not (path / COMPLETE).is_file():
        have = ", ".join(str(checkpoint_step(p)) for p in checkpoints(run_dir)) or "none"
        raise RunError(f"run {run_dir.name} has no complete {name}", f"complete checkpoints: {have}")
    return path


FINAL_ADAPTER = "final adapter"


def adapter_choices(run_dir: Path) -> list[str]:
    """The adapters of a run as a person picks them (the app's Adapter pickers): the final adapter, then each
    complete checkpoint as "checkpoint N". checkpoint_of() turns a pick back into adapter_path's argument."""
    return [FINAL_ADAPTER] + [f"checkpoint {checkpoint_step(p)}" for p in checkpoints(run_dir)]


def checkpoint_of(choice: str | None) -> int | None:
    """None for the final adapter (or no pick), N for "checkpoint N" (or "N")."""
    if choice in (None, "", FINAL_ADAPTER):
        return None
    text = str(choice).removeprefix("checkpoint").strip()
    if not text.isdigit():
        raise RunError(f"{choice!r} names no adapter", f'pick "{FINAL_ADAPTER}" or "checkpoint N"')
    return int(text)


# ---------------------------------------------------------------- fingerprint: what a resume must not change

def fingerprint(cfg: RunConfig, model_path: Path | None, tokens_sha256: str | None = None) -> dict:
    """What the checkpoints of a run depend on: the base model (source, config.json, weight files), its
    quantization, the LoRA shape, and the data (source, file contents, and in the child the tokenized rows)."""

    model = {"source": cfg.model.source, "quant": f"{cfg.quant.method}/{cfg.quant.quant_type}"}
    if model_path is not None:
        model_path = Path(model_path)
        model["config_sha256"] = sha(model_path / "config.json")
        model["weights"] = {p.name: p.stat().st_size for p in sorted(model_path.glob("*.safetensors"))}
    lo = cfg.lora
    lora = {"r": lo.r, "alpha": lo.alpha, "targets": lo.targets, "use_rslora": lo.use_rslora, "use_dora": lo.use_dora}
    d = cfg.data
    data = {"source": d.source, "format": d.format, "max_len": d.max_len, "train_on": d.train_on,
            "packing": d.packing, "limit": d.limit, "val_fraction": d.val_fraction}
    src = Path(d.source).expanduser()
    if not d.source.startswith("builtin:") and src.exists():
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + sha(f).encode())
        data["files_sha256"] = h.hexdigest()
    if tokens_sha256:
        data["tokens_sha256"] = tokens_sha256
    return {"model": model, "lora": lora, "data": data}


def write_fingerprint(run_dir: Path, fp: dict) -> None:
    write_atomic(Path(run_dir) / "fingerprint.json", json.dumps(fp, indent=1))


def read_fingerprint(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "fingerprint.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def compare_fingerprints(saved: dict, now: dict) -> list[str]:
    """Plain-language differences, e.g. "the LoRA shape changed (r: 16 -> 32)". Keys missing on either side
    (a cheap check without tokens) are not compared."""
    labels = {"model": "the base model changed", "lora": "the LoRA shape changed", "data": "the dataset changed"}
    problems = []
    for part, label in labels.items():
        a, b = saved.get(part, {}), now.get(part, {})
        diffs = [f"{k}: {_short(a[k])} -> {_short(b[k])}" for k in a if k in b and a[k] != b[k]]
        if diffs:
            problems.append(f"{label} ({'; '.join(diffs)})")
    return problems


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 24 else s[:12] + "…"
