"""`python -m core report RUN`: the run's report card. Did it learn what its data teaches (held-out loss, answers
beside the data's, the checker's accuracy), what did it change elsewhere (KL on neutral prompts), is it healthy,
and a verdict in plain words. Made on first ask and saved as report.json; made again when the adapter is newer.

  python -m core report latest
  python -m core report RUN --checkpoint 20
  python -m core report RUN --json
"""

from __future__ import annotations

import json

from core import report
from core.commands import terminal


def add_arguments(p) -> None:
    p.add_argument("run", help='run id, or "latest" for the most recent completed run')
    p.add_argument("--checkpoint", type=int, default=None, metavar="N", help="report on checkpoint-N instead of the final adapter")
    p.add_argument("--json", action="store_true", help="print report.json")


def run(args) -> int:
    progress = terminal.bar(args.json)  # loading, then each batch; nothing when piped or --json
    rep = report.get(args.run, args.checkpoint, progress=progress)
    if progress:
        progress.done()
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(text(rep))
    return 0


def text(rep: dict) -> str:
    """The report as plain text: verdict first, then the numbers behind it."""
    if rep.get("error"):
        e = rep["error"]
        return f"report of {rep['run']} could not be made: {e['message']}\nfix: {e.get('hint') or ''}"
    which = f"checkpoint {rep['checkpoint']}" if rep.get("checkpoint") is not None else "final adapter"
    out = [f"Report: {rep['run']} ({which}) on {rep['base_model']}, made in {rep['seconds']} s on {rep['device']}",
           "", rep["verdict"]["text"], "", "Task"]
    task = rep["task"]
    if task.get("error"):
        out.append(f"  not scored: {task['error']['message']}")
        if task["error"].get("hint"):
            out.append(f"  fix: {task['error']['hint']}")
    if task.get("loss"):
        lo = task["loss"]
        out.append(f"  loss on {lo['rows']} rows ({lo['split']}): base {lo['base']:.3f} (ppl {lo['base_ppl']:.1f}) "
                   f"-> adapter {lo['adapter']:.3f} (ppl {lo['adapter_ppl']:.1f}); KL {lo['kl']:.3f} nats/token")
    if task.get("checker"):
        c = task["checker"]
        out.append(f"  checker accuracy on {c['n']} held-out prompts: base {c['base']:.0%} -> adapter {c['adapter']:.0%}")
    if task.get("rewards"):
        rw = task["rewards"]
        out.append(f"  rewards on {rw['n']} prompts ({rw['split']}): mean total base {rw['base']:.3f} -> adapter "
                   f"{rw['adapter']:.3f}; above zero {rw['above_zero']['base']:.0%} -> {rw['above_zero']['adapter']:.0%}")
        for k, v in rw["rewards"].items():
            out.append(f"    {k} x{rw['weights'][k]:g}: mean {v['base']['mean']:.3f} -> {v['adapter']['mean']:.3f}, "
                       f"full marks {v['base']['full']:.0%} -> {v['adapter']['full']:.0%}")
        if rw["note"]:
            out.append(f"  note: {rw['note']}")
    if task.get("rouge_l"):
        r = task["rouge_l"]
        out.append(f"  ROUGE-L to the data's reply: base {r['base']:.2f} -> adapter {r['adapter']:.2f}")
    for a in task.get("answers", [])[:5]:
        if "base_reward" in a:
            out.append(f"  ? {a['prompt']}\n      base    [{a['base_reward']:.2f}]: {a['base']!r}"
                       f"\n      adapter [{a['adapter_reward']:.2f}]: {a['adapter']!r}")
            continue
        out.append(f"  ? {a['prompt']}\n      data:    {a['reference']!r}\n      base:    {a['base']!r}"
                   f"\n      adapter: {a['adapter']!r}")
    d = rep["drift"]
    out += ["", f"Drift ({d['prompts']} neutral prompts, answers of {d['tokens']} tokens)",
            f"  KL(base || adapter) {d['kl']:.4f} nats/token; {d['changed']}/{d['prompts']} answers changed"]
    for p in d.get("passes", {}).values() if d.get("system_prompt") else []:
        out.append(f"  {'with' if p is d['passes'].get('with_run_system') else 'without'} the run's system prompt: "
                   f"KL {p['kl']:.4f}, {p['changed']}/{p['prompts']} changed")
    for m in d["most_changed"]:
        out.append(f"  ? {m['prompt']} (KL {m['kl']:.3f})\n      base:    {m['base']!r}\n      adapter: {m['adapter']!r}")
    h = rep["health"]
    un = h["update_norm"]
    out += ["", "Health"]
    if un["max"] is not None:
        out.append(f"  update ||BA||/||W||: median {un['median']:.2e}, largest {un['max']:.2e} "
                   f"over {len(un['modules'])} modules")
    out.append(f"  no effect: {h['no_effect']['why'] or 'no'}")
    of = h["overfitting"]
    out.append(f"  overfitting: {of['note'] or 'no'}" + (f" (best checkpoint: {of['best_checkpoint']}: python -m core "
               f"report {rep['run']} --checkpoint {of['best_checkpoint']})" if of.get("flag") and of.get("best_checkpoint") is not None else ""))
    dv = h["divergence"]
    out.append(f"  divergence: {dv['nan_skips']} NaN steps skipped, {len(dv['spikes'])} loss spikes")
    return "\n".join(out)
