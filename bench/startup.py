"""How long from Start to the first chart point, and where does the time go? Starts the cpu-demo preset through
the runner (what the Start button calls: admit, run folder, spawn), waits for the first metrics event, stops the
run, and prints the child's start-up timeline (core.events.startup_timeline) phase by phase.

    .venv/bin/python bench/startup.py                       # cold (a fresh home) then 2 warm runs, table
    .venv/bin/python bench/startup.py --warm 3 --label after --json bench/results/startup-cpu-demo-after.json

cold: a fresh LORA_GARAGE_HOME, so the built-in model is converted from its GGUF and the data cache (and every
other cache under the home) is empty. warm: the same home again, everything cached. The OS file cache is warm in
both (the Python libraries were read moments before), so "cold" is a first run in a new home, not a first boot.
"to first step" is the test's own clock, from before runner.start to the first metrics event's `t`; the phases
are the child's own, back to back from the spawn (their sum is shown beside it). The load average is read before
and after each run: on a shared machine other processes take the cores, so compare runs with like loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402 - after the path is set


def one_run(home: Path, kind: str, timeout: float) -> dict:
    """Start cpu-demo in `home`, wait for its first metrics event, stop it. -> the run's numbers."""
    os.environ["LORA_GARAGE_HOME"] = str(home)
    from core import presets
    from core.runs import folder as runs
    from core.runs import runner

    cfg = presets.load("cpu-demo")
    cfg.train.report_at_end = False  # the report card after the stop is not start-up
    load_before = os.getloadavg()
    t0 = time.time()
    run_id = runner.start(cfg)
    run_dir = runs.get(run_id)
    first = None
    while first is None and time.time() - t0 < timeout:
        events = ev.read(run_dir)[0]
        curve = ev.metrics(events)
        if curve:
            first = curve[0][ev.T]
            break
        if runs.read_status(run_dir).get("state") not in runs.ACTIVE:
            raise SystemExit(f"the {kind} run ended before its first step:\n{runs.tail_log(run_dir, 30)}")
        time.sleep(0.2)
    if first is None:
        runner.stop(run_id, grace_s=30)
        raise SystemExit(f"no metrics event within {timeout:.0f} s:\n{runs.tail_log(run_dir, 30)}")
    load_after = os.getloadavg()
    pid = runs.read_status(run_dir).get("pid")
    runner.stop(run_id, grace_s=120)
    _wait_exit(pid)  # the next run waits for the lock otherwise, and that wait is not start-up
    rows = ev.startup_timeline(ev.read(run_dir)[0])
    return {"kind": kind, "run_id": run_id, "to_first_step_s": round(first - t0, 2),
            "phases_sum_s": round(sum(r[ev.DURATION_S] for r in rows), 2),
            "before_spawn_s": round(rows[0][ev.START] - t0, 2) if rows else None,
            "phases_cpu_s": round(sum(r[ev.CPU_S] or 0 for r in rows), 2),
            "phases": [{"phase": r[ev.PHASE], "s": r[ev.DURATION_S], "cpu_s": r[ev.CPU_S], "detail": r[ev.DETAIL]}
                       for r in rows],
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after]}


def _wait_exit(pid: int | None, timeout: float = 120) -> None:
    from core.runs import procs

    deadline = time.time() + timeout
    while pid and procs.is_alive(pid, None) and time.time() < deadline:
        time.sleep(0.2)


def table(results: list[dict]) -> str:
    """Per phase and run: wall seconds / CPU seconds of the child."""
    lines = [f"{'phase (wall / CPU s)':<20}" + "".join(f"{r['kind']:>15}" for r in results)]
    for name in ev.STARTUP_PHASES:
        cells = []
        for r in results:
            got = [p for p in r["phases"] if p["phase"] == name]
            wall, cpu = sum(p["s"] for p in got), sum(p["cpu_s"] or 0 for p in got)
            cells.append(f"{wall:8.2f} /{cpu:5.1f}" if got else f"{'-':>15}")
        lines.append(f"{name:<20}" + "".join(cells))
    lines.append(f"{'phases sum':<20}" + "".join(f"{r['phases_sum_s']:8.2f} /{r['phases_cpu_s']:5.1f}" for r in results))
    for key, label in (("before_spawn_s", "before spawn"), ("to_first_step_s", "to first step")):
        lines.append(f"{label:<20}" + "".join(f"{r[key]:8.2f}       " for r in results))
    lines.append(f"{'load avg before/after':<20}" + "".join(f"{r['loadavg_before'][0]:>9.1f}/{r['loadavg_after'][0]:<5.1f}"
                                                            for r in results))
    details = sorted({f"{r['kind']}: {p['phase']}: {p['detail']}" for r in results for p in r["phases"] if p["detail"]})
    return "\n".join(lines + ["", *details])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm", type=int, default=2, help="warm runs after the cold one")
    ap.add_argument("--home", type=Path, default=None,
                    help="the LORA_GARAGE_HOME to use (default: a fresh temporary one, deleted after)")
    ap.add_argument("--label", default="", help="a word saved in the JSON (e.g. before / after a change)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for a first step")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lg-startup-") as tmp:
        home = args.home or Path(tmp) / "home"
        results = [one_run(home, "cold", args.timeout)]
        for k in range(args.warm):
            results.append(one_run(home, f"warm{k + 1}", args.timeout))
    print(table(results))
    warm = [r["to_first_step_s"] for r in results[1:]]
    if warm:
        print(f"\nwarm median to first step: {statistics.median(warm):.2f} s on {os.cpu_count()} cores "
              f"(the goal of 12 s is for quiet cores; see the load averages above)")
    if args.json:
        out = {"bench": "startup", "preset": "cpu-demo", "label": args.label, "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
