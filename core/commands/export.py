"""`python -m core export RUN --merged OUT | --zip OUT.zip`: a merged safetensors model, or the adapter alone."""


def add_arguments(p) -> None:
    p.add_argument("run", help='run id, or "latest" for the most recent completed run')
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", metavar="OUT", help="folder for base + adapter merged (loads with AutoModelForCausalLM)")
    what.add_argument("--zip", metavar="OUT.zip", help="zip file with the adapter only (PEFT format)")
    p.add_argument("--checkpoint", type=int, default=None, metavar="N", help="export checkpoint-N instead of the final adapter")


def run(args) -> int:
    from core import export

    if args.zip:
        out = export.zip_adapter(args.run, args.zip, args.checkpoint)
        print(f"adapter zip written to {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    export.merge(args.run, args.merged, args.checkpoint, log=print)
    return 0
