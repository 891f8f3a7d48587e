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
    print("\n".join(report.outline(rep)))
    return 0

