"""Randomised fault campaign: does any SIGKILL lose work? N times: start a run, SIGKILL its training child, the
app that started it, or one rank of a two-process run, at a seeded random moment, then resume it (or, with no
complete checkpoint yet, start it again), and check:

- the run folder is readable (status.json, config.yaml, every events.jsonl line, no checkpoint without its
  COMPLETE marker left where a resume would load it, no half-written adapter after the resume);
- status.json says what happened (the child or a rank: failed, kind crash, naming SIGKILL; the app: the run
  trained on without it, and a new app process finds it, so status.json says running, then completed), and the
  resumed run completes;
- the resumed run's losses equal an uninterrupted run's from the checkpoint on (RESUME_TOLERANCE, as the resume
  test; a two-process run against an uninterrupted two-process run);
- no process of the run is left, and the one-run-at-a-time lock is free.

The moments (kill points of the child, LORA_GARAGE_FAULT kind@stepN, core/train/callbacks.py): "data" (tokenised,
before the resume point is recorded), "load" (base model loaded, before LoRA), "step" (a random step's backward
done, its optimizer step not), "save" (a random checkpoint half written), "final" (the final adapter written to
its temporary folder, not yet renamed). The child kills itself with SIGKILL at that point: on disk the same as a
kill -9 from outside at that moment, and the same moment every time for a seed. Two more:
"app" (the process that started the run with core.runs.runner.start, as the app's Start button does, and then
polls its status as the app's timer does, is SIGKILLed from outside once the run reaches a random step, 0 meaning
during start-up: the run goes on in its own session), and "rank" (rank 0 or 1 of a two-process gloo run, drawn at
random, kills itself in a random step or checkpoint save: the launcher ends the other rank and the run fails
naming it). The app stand-in is not the Gradio app itself: starting a run through the page's API would need the
whole form, and the app's Start calls this same function. The first trials cover each moment once; the rest draw a
moment at random.

    .venv/bin/python bench/fault_campaign.py --n 7                     # tiny model (built offline), table
    .venv/bin/python bench/fault_campaign.py --n 30 --model builtin    # the built-in SmolLM2-135M
    .venv/bin/python bench/fault_campaign.py --n 5 --json out.json --jobs 2 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
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
from core.config import save_yaml  # noqa: E402
from tests.helpers.training import RESUME_TOLERANCE, losses, tiny_config, wait_until_done, write_dataset  # noqa: E402

MOMENTS = ("data", "load", "step", "save", "final", "app", "rank")
MAX_STEPS, SAVE_STEPS = 6, 2
BUILTIN = "builtin:smollm2-135m"
# the app's part in a run, in a process of its own: start it as the Start button does, then poll as the page does
APP = ("import sys, time\n"
       "from core.config import load_yaml\n"
       "from core.runs import runner\n"
       "print(runner.start(load_yaml(sys.argv[1])), flush=True)\n"
       "while True:\n"
       "    runner.running()\n"
       "    time.sleep(0.5)\n")


def plan(n: int, seed: int) -> list[tuple[str, str]]:
    """[(moment, fault)] for n trials: each moment once (in a seeded order), then seeded draws. The fault is
    LORA_GARAGE_FAULT's kind@stepN; "app@stepN" (kill the app once the run reaches step N) and
    "rankR:kind@stepN" (the fault in rank R alone) are the campaign's own."""
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
        elif m == "app":
            fault = f"app@step{rng.randint(0, MAX_STEPS - 1)}"
        elif m == "rank":
            kind = rng.choice(("killstep", "killsave"))
            step = rng.randint(1, MAX_STEPS) if kind == "killstep" else rng.choice(range(SAVE_STEPS, MAX_STEPS + 1,
                                                                                          SAVE_STEPS))
            fault = f"rank{rng.randint(0, 1)}:{kind}@step{step}"
        else:
            fault = f"kill{m}@step0"
        out.append((m, fault))
    return out


def config(model: str, data: Path, ranks: int = 1):
    cfg = tiny_config(model, data, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=2)
    if ranks > 1:  # as tests/test_distributed.py: per-rank dropout streams would differ from one process's
        cfg.lora.dropout, cfg.train.devices = 0.0, str(ranks)
    return cfg


def _env(home: Path, fault: str = "", rank: str = "") -> None:
    """A worker process's environment for one trial (a worker runs several: nothing may carry over)."""
    os.environ.update(LORA_GARAGE_HOME=str(home), OMP_NUM_THREADS="1", LORA_GARAGE_FAULT=fault,
                      LORA_GARAGE_FAULT_RANK=rank)


def _home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir()
    (home / "models").symlink_to(root / "models", target_is_directory=True)  # the built-in model converted once
    return home


def reference(root: Path, model: str, data: Path, ranks: int = 1) -> dict[int, float]:
    """The uninterrupted run's losses (in a worker process: the environment is per process)."""
    _env(_home(root, f"reference-{ranks}"))
    run_dir = runs.get(runner.start(config(model, data, ranks)))
    st = wait_until_done(run_dir, 1800)
    if st["state"] != "completed":
        raise SystemExit(f"the reference run did not complete:\n{runs.tail_log(run_dir, 40)}")
    return losses(run_dir)


def left_behind(run_dir: Path, grace_s: float = 120.0, problems: list | None = None) -> list[int]:
    """Processes still running for this run (the child, the launcher, ranks: their command line names it) once
    grace_s has passed. A child writes its final status, then makes the run's report card (report_at_end), then
    exits: on a loaded machine that takes a while, so it gets that long to go. Each one left is named in
    `problems`."""
    deadline = time.time() + grace_s
    while True:
        left = _named(run_dir)
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    for pid in left:
        try:
            what = " ".join(psutil.Process(pid).cmdline())[:160]
        except psutil.Error:
            what = "(ended while being named)"
        if problems is not None:
            problems.append(f"process {pid} left {grace_s:.0f} s after the run ended: {what}")
    return left


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


def start_app(home: Path, cfg, at_step: int) -> tuple[Path, bool, list[str]]:
    """Start the run from an app process, SIGKILL that process once the run reaches at_step (0: as soon as the
    training child runs), and check that a new app process finds the run still going.
    -> (run dir, whether the app died of the SIGKILL, problems)."""
    save_yaml(cfg, home / "start.yaml")
    app = subprocess.Popen([sys.executable, "-c", APP, str(home / "start.yaml")], cwd=str(ROOT), text=True,
                           stdout=subprocess.PIPE, env=dict(os.environ), start_new_session=True)
    run_id = app.stdout.readline().strip()
    if not run_id:
        app.kill()
        raise SystemExit(f"the app process did not start a run (exit {app.wait()})")
    run_dir = runs.get(run_id)
    while True:
        st = runs.read_status(run_dir)
        if st["state"] not in runs.ACTIVE or (st.get("pid") and (st.get("step") or 0) >= at_step
                                              and st["state"] == "running"):
            break
        time.sleep(0.1)
    os.kill(app.pid, signal.SIGKILL)
    killed = app.wait() == -signal.SIGKILL
    problems = []
    st = runs.read_status(run_dir)
    if st["state"] not in runs.ACTIVE and st["state"] != "completed":
        problems.append(f"the run ended {st['state']} when its app was killed")
    elif st["state"] in runs.ACTIVE and runner.running() != run_id:  # what a restarted app does first
        problems.append("a new app process does not find the running run")
    return run_dir, killed, problems


def trial(root: Path, i: int, moment: str, fault: str, model: str, data: Path, want: dict[int, float]) -> dict:
    """One kill and its resume, in a worker process with its own home. -> a row of the table. `want` holds the
    uninterrupted losses by number of processes."""
    t0 = time.time()
    home = _home(root, f"trial-{i}")
    problems = []
    ranks = 2 if moment == "rank" else 1
    want = want[ranks]
    if moment == "app":
        _env(home)
        run_dir, app_killed, problems = start_app(home, config(model, data), int(fault.partition("@step")[2]))
    else:
        rank, _, kill = fault.rpartition(":")  # "rank1:killstep@step3": the fault in rank 1 alone
        _env(home, kill, rank.removeprefix("rank"))
        run_dir = runs.get(runner.start(config(model, data, ranks)))
    st = wait_until_done(run_dir, 1800)
    err = st.get("error") or {}
    if moment == "app":  # the app died, the run did not: it trains to the end, and status.json says so
        killed = app_killed
        if st["state"] != "completed":
            problems.append(f"the run ended {st['state']} after its app was killed, not completed")
    else:
        killed = st["state"] == "failed" and err.get("kind") == "crash" and "SIGKILL" in err.get("message", "")
        if moment == "rank":
            killed = killed and err["message"].startswith(f"rank {fault[4]} ended")
    problems += readable(run_dir, after_resume=False)
    left = left_behind(run_dir, problems=problems)
    lock_free = runner.running() is None
    os.environ["LORA_GARAGE_FAULT"] = ""
    latest = runs.latest_checkpoint(run_dir)
    if moment == "app":  # nothing to resume: the losses of the run itself are compared
        how, from_step, resumed = "trained on without its app", 0, run_dir
    elif latest is not None:
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
    extra = sorted(set(got) - set(want))  # a step the uninterrupted run never took
    if extra:
        problems.append(f"the resumed run logged steps the uninterrupted run has not: {extra}")
    equal = all(s in got for s in steps) and not extra and diff <= RESUME_TOLERANCE
    left += left_behind(resumed, problems=problems)
    lock_free = lock_free and runner.running() is None
    return {"trial": i, "moment": moment, "fault": fault, "killed": killed, "how": how,
            "recovered": st2["state"] == "completed", "losses_equal": equal, "max_loss_diff": diff,
            "processes_left": len(set(left)), "lock_free": lock_free, "problems": problems,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=len(MOMENTS),
                    help=f"trials (the first {len(MOMENTS)} cover each moment once)")
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
        refs = {n: pool.submit(reference, root, model, data, n)
                for n in sorted({2 if m == "rank" else 1 for m, _ in trials})}
        want = {n: f.result() for n, f in refs.items()}
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
    print(f"\n{'#':>3}  {'moment':<6} {'fault':<20} {'killed':<6} {'recovered':<9} {'losses equal':<12} "
          f"{'max diff':>9} {'left':>4} {'lock':<4} {'seconds':>7}  how / problems")
    for r in rows:
        print(_row(r))


def _row(r: dict) -> str:
    return (f"{r['trial']:>3}  {r['moment']:<6} {r['fault']:<20} {_yn(r['killed']):<6} {_yn(r['recovered']):<9} "
            f"{_yn(r['losses_equal']):<12} {r['max_loss_diff']:>9.2g} {r['processes_left']:>4} "
            f"{'free' if r['lock_free'] else 'HELD':<4} {r['seconds']:>7}  {r['how']}"
            + (f"; {'; '.join(r['problems'])}" if r["problems"] else ""))


def _yn(v: bool) -> str:
    return "yes" if v else "NO"


if __name__ == "__main__":
    sys.exit(main())
