"""`python -m core runs`: list runs, show one, follow its log, stop, resume or delete it.

  python -m core runs                    # the list, newest first
  python -m core runs show RUN           # status, last metrics, checkpoints, adapter, the start-up timeline
  python -m core runs stop RUN           # stop request: finish the step, save, mark stopped (killed after --grace)
  python -m core runs resume RUN [--wait]
  python -m core runs log RUN            # the end of train.log
  python -m core runs delete RUN
"""

from __future__ import annotations

import json
import time

from core import events as ev
from core.errors import RunError
from core.runs import folder as runs
from core.runs import resolve as run_files
from core.runs import runner

ACTIONS = ("list", "show", "stop", "resume", "log", "delete")


def add_arguments(p) -> None:
    p.add_argument("action", nargs="?", default="list", choices=ACTIONS)
    p.add_argument("run_id", nargs="?", metavar="RUN")
    p.add_argument("--json", action="store_true", help="machine-readable output (list, show)")
    p.add_argument("--grace", type=float, default=None,
                   help="stop: seconds before the run is killed (default: max(30, 3x the run's last step time))")
    p.add_argument("--wait", action="store_true", help="resume: wait until the run ends, printing its steps")
    p.add_argument("--lines", type=int, default=40, help="log: how many lines")


def run(args) -> int:
    if args.action == "list":
        return _list(args)
    if not args.run_id:
        raise RunError(f"`runs {args.action}` needs a run id", "python -m core runs lists them")
    if args.action == "show":
        return _show(args)
    if args.action == "stop":
        print(runner.stop(args.run_id, grace_s=args.grace))
        return 0
    if args.action == "resume":
        run_id = runner.resume(args.run_id)
        print(run_id)
        return _follow(run_id) if args.wait else 0
    if args.action == "log":
        print(runs.tail_log(runs.get(args.run_id), args.lines))
        return 0
    runner.delete(args.run_id)
    print(f"deleted {args.run_id}")
    return 0


def _list(args) -> int:
    rows = runs.list_runs()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no runs yet: python -m core train --preset cpu-demo")
        return 0
    for r in rows:
        steps = f"{r.get('step') or 0}/{r.get('total_steps') or '?'}"
        print(f"{r['id']:<48} {r['state']:<10} {steps:>9}  {r.get('method', '')}  {r.get('model', '')}")
    return 0


def _show(args) -> int:
    run_dir = runs.get(args.run_id)
    st = runs.read_status(run_dir)
    events, _ = ev.read(run_dir)
    curve = ev.metrics(events)
    info = {"id": run_dir.name, "path": str(run_dir), **st, "last_metrics": curve[-1] if curve else None,
            "checkpoints": [p.name for p in runs.checkpoints(run_dir)],
            "adapter": str(run_dir / "adapter") if run_files.has_adapter(run_dir) else None,
            "template_notice": ev.template_notice(events),
            "recovered": [r.get(ev.MESSAGE) for r in ev.recoveries(events)],
            "startup": ev.startup_timeline(events)}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key in ("id", "state", "step", "total_steps", "started_at", "resumed_at", "ended_at", "noticed_at",
                "checkpoints", "adapter"):
        if key in ("resumed_at", "noticed_at") and not info.get(key):
            continue  # only for runs that were resumed / whose end was noticed after the fact
        print(f"{key:>12}: {info.get(key)}")
    if curve:
        print(f"{'last loss':>12}: {curve[-1].get(ev.LOSS)} at step {curve[-1].get(ev.STEP)}")
    peak = ev.peak_memory(events)
    if peak:
        est = runs.estimate_bytes(run_dir)
        vs = f" (estimate {est / 2**30:.2f} GB, {100 * (peak[0] - est) / est:+.0f}%)" if est else ""
        print(f"{'peak memory':>12}: {peak[0] / 2**30:.2f} GB {ev.MEM_SERIES[peak[1]]}{vs}")
    notice = ev.template_notice(events)
    if notice:
        print(f"{'template':>12}: {notice}")
    for message in info["recovered"]:
        print(f"{'recovered':>12}: {message.removeprefix('recovered ')}")
    timeline = ev.format_timeline(info["startup"])
    if timeline:
        print(f"{'start-up':>12}:\n" + "\n".join("    " + line for line in timeline.splitlines()))
    if st.get("error"):
        err = st["error"]
        print(f"{'error':>12}: [{err.get('kind')}] {err.get('message')}\n{'fix':>12}: {err.get('hint')}")
    return 0


def _follow(run_id: str) -> int:
    run_dir = runs.get(run_id)
    offset = 0
    while True:
        events, offset = ev.read(run_dir, offset)
        for e in events:
            if e.get(ev.TYPE) == ev.METRICS:
                print(f"step {e[ev.STEP]}  loss {e.get(ev.LOSS)}", flush=True)
            elif e.get(ev.TYPE) == ev.LOG:
                print(f"[{e.get(ev.LEVEL)}] {e.get(ev.MESSAGE)}", flush=True)
        st = runs.read_status(run_dir)
        if st.get("state") not in runs.ACTIVE:
            print(st["state"])
            return 0 if st["state"] in ("completed", "stopped") else 1
        time.sleep(1.0)
