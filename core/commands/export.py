"""`python -m core export RUN --merged OUT | --zip OUT.zip | --gguf DIR [--quant ...]`: a merged safetensors model,
the adapter alone, or GGUF files with an Ollama Modelfile, checked against the adapter."""

from core import export
from core.gguf import export as gguf_export
from core.gguf.tools import QUANTS


def add_arguments(p) -> None:
    p.add_argument("run", help='run id, or "latest" for the most recent completed run')
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", metavar="OUT", help="folder for base + adapter merged (loads with AutoModelForCausalLM)")
    what.add_argument("--zip", metavar="OUT.zip", help="zip file with the adapter only (PEFT format)")
    what.add_argument("--gguf", metavar="DIR", help="new folder for GGUF files, a Modelfile for Ollama and README.txt "
                      "(llama.cpp's converter is fetched on first use)")
    p.add_argument("--quant", nargs="+", choices=QUANTS, default=None, metavar="TYPE",
                   help=f"GGUF types to write with --gguf: {', '.join(QUANTS)} (default q8_0). f16 and q8_0 need no "
                   "compiler; k-quants build llama.cpp's quantizer on first use (a C++ compiler, ~7 CPU-minutes)")
    p.add_argument("--no-check", action="store_true", help="with --gguf: skip the parity check against the adapter")
    p.add_argument("--checkpoint", type=int, default=None, metavar="N", help="export checkpoint-N instead of the final adapter")


def run(args) -> int:
    if args.zip:
        out = export.zip_adapter(args.run, args.zip, args.checkpoint)
        print(f"adapter zip written to {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.gguf:
        report = gguf_export.export_gguf(args.run, args.gguf, args.quant, args.checkpoint, say=print,
                                         parity=not args.no_check)
        for q, f in report["files"].items():
            print(f"{q}: {f['file']}  {f['bytes'] / 1e6:.1f} MB  {f['bits_per_weight']} bits/weight  {f['types']}")
        print(f"times (s): {report['times_s']}")
        print(f"written to {args.gguf}: see README.txt there for Ollama / llama.cpp / LM Studio")
        return 0 if all(r["passed"] for r in report["parity"]) else 1
    if args.quant or args.no_check:
        print("error: --quant and --no-check go with --gguf")
        return 2
    export.merge(args.run, args.merged, args.checkpoint, log=print)
    return 0
