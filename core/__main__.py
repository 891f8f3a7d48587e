"""`python -m core <command>`: the headless face of LoRA Garage. Each command lives in core/commands/<name>.py
with `add_arguments(parser)` and `run(args) -> int`."""

import argparse
import importlib
import sys

from core.errors import GarageError, disk_full_cause
from core.paths import home

COMMANDS = {
    "train": "train a LoRA / QLoRA adapter (a run folder under $LORA_GARAGE_HOME/runs)",
    "data": "inspect a dataset: detected format, columns, token lengths, rendered examples",
    "estimate": "VRAM estimate for full / LoRA / QLoRA and whether it fits your GPU",
    "runs": "list runs; show, stop, resume, log or delete one",
    "chat": "chat with a trained adapter (or compare it with the base model)",
    "eval": "score base vs adapter on a run's held-out eval prompts",
    "rewards": "try a GRPO run's rewards: sample a few completions and score each, before training",
    "report": "a run's report card: did it learn, what did it change elsewhere, is it healthy (report.json)",
    "export": "merge an adapter into its base, zip it, or write GGUF + an Ollama Modelfile (--gguf)",
    "serve": "serve the base model and every run's adapter through an OpenAI-compatible API",
    "doctor": "what LoRA Garage sees: Python, torch, bitsandbytes, GPUs, RAM, home folder, disk",
}


def build_parser(prog: str = "python -m core") -> argparse.ArgumentParser:
    """The whole command line, every command's arguments included; parsing runs nothing (docs test uses it).
    `prog` is the name shown in help: `lora-garage` when the console command runs it."""
    parser = argparse.ArgumentParser(prog=prog, description="LoRA Garage: LoRA / QLoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _command(name).add_arguments(p)
    return parser


def _command(name: str):
    return importlib.import_module(f"core.commands.{name}")


def main(argv=None, prog: str = "python -m core") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return int(_command(args.command).run(args) or 0)
    except GarageError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"fix:   {e.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        cause = disk_full_cause(e)  # e.g. the built-in model's first-use conversion, wrapped by safetensors
        if cause is None:
            raise

        print(f"error: the disk filled up ({cause})", file=sys.stderr)
        print(f"fix:   free up space on the disk holding {home()}, or point LORA_GARAGE_HOME at a bigger disk",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
