"""Randomised fault campaign: does any SIGKILL lose work? N times: start a run, SIGKILL its training child at a
seeded random moment, then resume it (or, with no complete checkpoint yet, start it again), and check:

- the run folder is readable (status.json, config.yaml, every events.jsonl line, no checkpoint without its
  COMPLETE marker left where a resume would load it, no half-written adapter after the resume);
- status.json says what happened (failed, kind crash, naming SIGKILL), and the resumed run completes;
- the resumed run's losses equal an uninterrupted run's from the checkpoint on (RESUME_TOLERANCE, as the resume
  test);
- no process of the run is left, and the one-run-at-a-time lock is free.

The moments (kill points of the child, LORA_GARAGE_FAULT kind@stepN, core/train/callbacks.py): "data" (tokenised,
before the resume point is recorded), "load" (base model loaded, before LoRA), "step" (a random step's backward
done, its optimizer step not), "save" (a random checkpoint half written), "final" (the final adapter written to
its temporary folder, not yet renamed). The child kills itself with SIGKILL at that point: on disk the same as a
kill -9 from outside at that moment, and the same moment every time for a seed. The first trials cover each moment
once; the rest draw a moment at random.

    .venv/bin/python bench/fault_campaign.py --n 5                     # tiny model (built offline), table
    .venv/bin/python bench/fault_campaign.py --n 30 --model builtin    # the built-in SmolLM2-135M
    .venv/bin/python bench/fault_campaign.py --n 5 --json out.json --jobs 2 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402 - after the path is set

from core import events as ev  # noqa: E402
from core.runs import folder as runs  # noqa: E402
from core.runs import runner  # noqa: E402
from tests.helpers.training import RESUME_TOLERANCE, losses, tiny_config, wait_until_done, write_dataset  # noqa: E402

MOMENTS = ("data", "load", "step", "save", "final")
MAX_STEPS, SAVE_STEPS = 6, 2
BUILTIN = "builtin:smollm2-135m"


def plan(n: int, seed: int) -> list[tuple[str, str]]:
    """[(moment, LORA_GARAGE_FAULT)] for n trials: each moment once (in a seeded order), then seeded draws."""
    rng = random.Random(seed)
    first = list(MOMENTS)
    rng.shuffle(first)
    moments = (first + [rng.choice(MOMENTS) for _ in range(max(0, n - len(MOMENTS)))])[:n]
    out = []
    for m in moments:
        if m == "step":
            fault = f"killstep@step{rng.randint(1, MAX_STEPS)}"
        elif m == "save":
            fault = f"killsave@step{rng.choice(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))}"
        else:
            fault = f"kill{m}@step0"
        out.append((m, fault))
    return out


def config(model: str, data: Path):
    return tiny_config(model, data, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=2)


def _env(home: Path, fault: str = "") -> None:
    os.environ.update(LORA_GARAGE_HOME=str(home), OMP_NUM_THREADS="1", LORA_GARAGE_FAULT=fault)


def _home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir()
    (home / "models").symlink_to(root / "models", target_is_directory=True)  # the built-in model converted once
    return home


def reference(root: Path, model: str, data: Path) -> dict[int, float]:
    """The uninterrupted run's losses (in a worker process: the environment is per process)."""
    _env(_home(root, "reference"))
    run_dir = runs.get(runner.start(config(model, data)))
    st = wait_until_done(run_dir, 1800)
    if st["state"] != "completed":
        raise SystemExit(f"the reference run did not complete:\n{runs.tail_log(run_dir, 40)}")
    return losses(run_dir)


def left_behind(run_dir: Path, grace_s: float = 20.0) -> list[int]:
    """Processes still running for this run (the child, the launcher, ranks: their command line names it) once
    grace_s has passed. A child writes its final status just before it exits, so it gets that long to go."""
    deadline = time.time() + grace_s
    while True:
        left = _named(run_dir)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def _named(run_dir: Path) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if str(run_dir) in " ".join(p.info["cmdline"] or []) and p.is_running() and p.status() != "zombie":
                out.append(p.info["pid"])
        except psutil.Error:
            continue
    return out


def readable(run_dir: Path, after_resume: bool) -> list[str]:
    """What is wrong with the run folder ([] when nothing is)."""
    problems = []
    try:
        runs.read_status(run_dir)
        runs.load_config(run_dir)
    except Exception as e:  # noqa: BLE001 - the campaign reports any failure to read as a finding
        problems.append(f"{type(e).__name__}: {e}")
    events, _ = ev.read(run_dir)
    problems += [e[ev.MESSAGE] for e in ev.logs(events) if "unreadable event line" in e.get(ev.MESSAGE, "")]
    if after_resume:
        for ck in runs.checkpoints_dir(run_dir).glob("checkpoint-*"):
            if not (ck / runs.COMPLETE).is_file():
                problems.append(f"{ck.name} has no COMPLETE marker and was not set aside")
        if (run_dir / ".adapter.tmp").exists():
            problems.append(".adapter.tmp left behind")
        if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
            problems.append("no adapter after the resumed run completed")
    return problems


def trial(root: Path, i: int, moment: str, fault: str, model: str, data: Path, want: dict[int, float]) -> dict:
    """One kill and its resume, in a worker process with its own home. -> a row of the table."""
    t0 = time.time()
    home = _home(root, f"trial-{i}")
    _env(home, fault)
    run_dir = runs.get(runner.start(config(model, data)))
    st = wait_until_done(run_dir, 1800)
    err = st.get("error") or {}
    killed = st["state"] == "failed" and err.get("kind") == "crash" and "SIGKILL" in err.get("message", "")
    problems = readable(run_dir, after_resume=False)
    left = left_behind(run_dir)
    lock_free = runner.running() is None
    os.environ["LORA_GARAGE_FAULT"] = ""
    latest = runs.latest_checkpoint(run_dir)
    if latest is not None:
        how, from_step = f"resumed from {latest.name}", runs.checkpoint_step(latest)
        runner.resume(run_dir.name)
        resumed = run_dir
    else:  # killed before the first checkpoint: nothing to resume, the run starts again
        how, from_step = "started again (no checkpoint yet)", 0
        resumed = runs.get(runner.start(runs.load_config(run_dir)))
    st2 = wait_until_done(resumed, 1800)
    problems += readable(resumed, after_resume=True) if st2["state"] == "completed" else [
        f"resumed run ended {st2['state']}: {(st2.get('error') or {}).get('message')}"]
    got = losses(resumed)
    steps = [s for s in want if s > from_step]
    diff = max((abs(want[s] - got[s]) for s in steps if s in got), default=0.0)
    equal = all(s in got for s in steps) and diff <= RESUME_TOLERANCE
    left += left_behind(resumed)
    lock_free = lock_free and runner.running() is None
    return {"trial": i, "moment": moment, "fault": fault, "killed": killed, "how": how,
            "recovered": st2["state"] == "completed", "losses_equal": equal, "max_loss_diff": diff,
            "processes_left": len(set(left)), "lock_free": lock_free, "problems": problems,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5, help="trials (the first 5 cover each moment once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", choices=("tiny", "builtin"), default="tiny")
    ap.add_argument("--jobs", type=int, default=2, help="trials at once (each in its own home)")
    ap.add_argument("--root", type=Path, default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the summary here")
    args = ap.parse_args(argv)

    root = args.root or Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    data = write_dataset(root / "identity.jsonl")
    if args.model == "tiny":
        from tests.helpers.tiny import build_tiny_model

        model = str(build_tiny_model(root / "tiny-model"))
    else:
        model = BUILTIN
    trials = plan(args.n, args.seed)
    print(f"fault campaign: {args.n} trials, seed {args.seed}, model {args.model}, {args.jobs} at once, in {root}; "
          f"the uninterrupted reference run first", flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        want = pool.submit(reference, root, model, data).result()
        futures = [pool.submit(trial, root, i, m, f, model, data, want) for i, (m, f) in enumerate(trials, 1)]
        rows = []
        for fut in futures:  # each row as it comes: a long campaign shows its progress
            row = fut.result()
            rows.append(row)
            print(f"  {_row(row)}", flush=True)
    print_table(rows)
    ok = all(r["killed"] and r["recovered"] and r["losses_equal"] and not r["processes_left"] and r["lock_free"]
             and not r["problems"] for r in rows)
    summary = {"n": len(rows), "seed": args.seed, "model": args.model, "all_ok": ok,
               "killed": sum(r["killed"] for r in rows), "recovered": sum(r["recovered"] for r in rows),
               "losses_equal": sum(r["losses_equal"] for r in rows),
               "processes_left": sum(r["processes_left"] for r in rows), "seconds": round(time.time() - t0, 1)}
    print(f"\n{summary['recovered']}/{summary['n']} recovered, {summary['losses_equal']}/{summary['n']} losses equal, "
          f"{summary['processes_left']} processes left, {summary['seconds']} s in all")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0 if ok else 1


def print_table(rows: list[dict]) -> None:
    print(f"\n{'#':>3}  {'moment':<6} {'fault':<16} {'killed':<6} {'recovered':<9} {'losses equal':<12} "
          f"{'max diff':>9} {'left':>4} {'lock':<4} {'seconds':>7}  how / problems")
    for r in rows:
        print(_row(r))


def _row(r: dict) -> str:
    return (f"{r['trial']:>3}  {r['moment']:<6} {r['fault']:<16} {_yn(r['killed']):<6} {_yn(r['recovered']):<9} "
            f"{_yn(r['losses_equal']):<12} {r['max_loss_diff']:>9.2g} {r['processes_left']:>4} "
            f"{'free' if r['lock_free'] else 'HELD':<4} {r['seconds']:>7}  {r['how']}"
            + (f"; {'; '.join(r['problems'])}" if r["problems"] else ""))


def _yn(v: bool) -> str:
    return "yes" if v else "NO"


if __name__ == "__main__":
    sys.exit(main())
