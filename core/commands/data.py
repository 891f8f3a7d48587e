"""`python -m core data PATH_OR_ID`: what the model will be trained on, before you train.

Prints the detected format, the column mapping, the row count, token lengths against the cutoff and two
rendered examples with the trained text marked. --json prints one object instead. --objective dpo (or orpo) reads
the file as chosen / rejected pairs and shows each pair's prompt and both replies, as the Train page's Inspect does.
"""

from __future__ import annotations

import json

from core.commands import terminal
from core.errors import ConfigError
from core.config import OBJECTIVES, PREFERENCE_OBJECTIVES, RunConfig, apply_overrides
from core.data.prompts import PromptSample
from core.data.sft import FORMATS
from core.data.sft import prepare, preview_text
from core.models import load_tokenizer


def add_arguments(p) -> None:
    p.add_argument("source", metavar="PATH_OR_ID", help="a file, a folder, a hub id (owner/name) or builtin:demo-identity")
    p.add_argument("--model", default="builtin:smollm2-135m", help="model whose tokenizer and chat template to use")
    p.add_argument("--max-len", type=int, default=512, help="the cutoff in tokens (data.max_len)")
    p.add_argument("--objective", default="sft", choices=OBJECTIVES,
                   help="train.objective: sft (one reply per row), or dpo / orpo (chosen / rejected pairs)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="row format; auto detects it")
    p.add_argument("--column", action="append", default=[], metavar="ROLE=COLUMN",
                   help="column mapping, e.g. --column prompt=question --column response=answer")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--subset", default="", help="subset (config name) of a hub dataset")
    p.add_argument("--train-on", default="assistant", choices=("assistant", "all"), help="which tokens carry the loss")
    p.add_argument("--overlong", default="truncate", choices=("truncate", "drop"), help="rows over --max-len")
    p.add_argument("--packing", action="store_true", help="pack short rows into --max-len sequences")
    p.add_argument("--limit", type=int, default=0, help="read only the first N rows (0 = all)")
    p.add_argument("--set", action="append", default=[], metavar="data.fill.NAME=VALUE",
                   help="fill a {{placeholder}} (data.fill.name=Garage), or set any other data.* setting")
    p.add_argument("--examples", type=int, default=2, help="rendered examples to print")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    cfg = RunConfig()
    cfg.model.source = args.model
    d = cfg.data
    d.source, d.max_len, d.format, d.columns = args.source, args.max_len, args.format, _columns(args.column)
    d.split, d.subset, d.train_on, d.overlong = args.split, args.subset, args.train_on, args.overlong
    d.packing, d.limit = args.packing, args.limit
    cfg.train.objective = args.objective
    _check_pair_options(args)
    for item in args.set:
        if not item.strip().startswith("data."):
            raise ConfigError(item.split("=", 1)[0], "the data command takes only data.* settings",
                              "e.g. --set data.fill.name=Garage")
    cfg = apply_overrides(cfg, args.set)
    cfg.validate()

    bar = terminal.bar(args.json)  # nothing when piped or --json
    if bar:
        bar(f"loading the tokenizer of {args.model}")
    tokenizer = load_tokenizer(args.model, progress=(lambda msg: bar(f"first use of the model: {msg}")) if bar else None)
    prepared = prepare(cfg, tokenizer, progress=(lambda done, total: bar("rows tokenised", done, total)) if bar else None)
    if bar:
        bar.done()
    stats = prepared.stats
    if args.json:
        out = {"format": stats.format, "rows": stats.rows, "columns": stats.columns, "tokens": stats.tokens(),
               "source": stats.source, "model": args.model, "template_is_default": stats.template_is_default,
               "train_on": stats.train_on, "train_rows": stats.train_rows, "packing": stats.packing,
               "warnings": stats.warnings, "ignored_columns": stats.ignored_columns,
               "placeholders": stats.placeholders, "filled": stats.filled, "tools": stats.tools,
               "reasoning": stats.reasoning, "loss_weight_zero": stats.loss_weight_zero, "objective": args.objective,
               "examples": [_example_json(s) for s in prepared.samples[:args.examples]]}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(_report(stats, args))
    print()
    shown = min(args.examples, len(prepared.samples))
    if args.objective == "sft":
        print(f"{shown} rendered examples; text inside ⟦ ⟧ carries the loss, the rest is masked:")
    elif args.objective == "grpo":
        print(f"{shown} rendered prompts, as the model sees them (the model writes each reply, and the rewards "
              "score it with the columns shown):")
    else:
        print(f"{shown} rendered pairs: the prompt (no loss), then each reply inside ⟦ ⟧ (the text "
              f"{args.objective} compares):")
    print(preview_text(prepared, args.examples))
    return 0


def _check_pair_options(args) -> None:
    """Pairs are read by their shape (core.data.pref), and train on their replies: the SFT reading options would
    be ignored, so they are refused rather than dropped in silence."""
    if args.objective == "sft":
        return
    given = [(flag, field) for flag, field, on in (("--format", "data.format", args.format != "auto"),
                                                   ("--column", "data.columns",
                                                    bool(args.column) and args.objective != "grpo"),
                                                   ("--train-on", "data.train_on", args.train_on != "assistant"))
             if on]
    if given:
        flag, field = given[0]
        raise ConfigError(field, f"{flag} applies to --objective sft; preference pairs are read by their shape "
                          f"(prompt / chosen / rejected columns, or message lists) and train on their replies",
                          f"leave out {flag} with --objective {args.objective}")


def _example_json(sample):
    """An example for --json: [[text, trained], ...] runs, or for a pair {prompt, chosen, rejected} runs and lengths."""
    if isinstance(sample, list):
        return [[t, m] for t, m in sample]
    if isinstance(sample, PromptSample):
        return {"prompt": sample.prompt, "columns": sample.columns, "length": sample.length}
    return {"prompt": [[t, m] for t, m in sample.prompt], "chosen": [[t, m] for t, m in sample.chosen],
            "rejected": [[t, m] for t, m in sample.rejected], "chosen_len": sample.chosen_len,
            "rejected_len": sample.rejected_len}


def _columns(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("data.columns", f"{item!r} should look like ROLE=COLUMN", "e.g. --column prompt=question")
        role, col = item.split("=", 1)
        out[role.strip()] = col.strip()
    return out


def _report(stats, args) -> str:
    t = stats.tokens()
    mapping = ", ".join(f"{role} <- {col}" for role, col in stats.columns.items())
    template = ("default ChatML (the model has no chat template)" if stats.template_is_default
                else "the model's own chat template")
    share = f"{100 * t['trained'] / t['total']:.0f}%" if t["total"] else "0%"
    pairs = args.objective in PREFERENCE_OBJECTIVES
    unit = "pairs" if pairs else "prompts" if args.objective == "grpo" else "rows"
    detected = ("  (shape auto-detected)" if pairs else "  (auto-detected; override with --format)"
                if args.format == "auto" else "")
    lines = [
        f"dataset   {stats.source}",
        f"format    {stats.format}{detected}",
        f"columns   {mapping}",
        f"{unit:<9} {stats.rows:,}" + (f"  (training sequences: {stats.train_rows:,})" if stats.train_rows != stats.rows else ""),
        f"model     {args.model}: {template}" if stats.format != "text" else f"model     {args.model}",
        f"tokens    min {t['min']} · median {t['median']} · mean {t['mean']} · p95 {t['p95']} · max {t['max']}"
        + ("  (prompt + the longer reply)" if pairs else ""),
        f"cutoff    {t['max_len']}: {t['over_max_len']:,} {unit} over it"
        + (f" ({t['truncated']:,} cut, {t['dropped']:,} dropped)" if stats.format != "text" else " (text is chunked)"),
        f"loss on   {stats.train_on}: {t['trained']:,} of {t['total']:,} tokens per epoch ({share})",
    ]
    if stats.tools:
        lines.append("tools     " + ("the chat template's own tool support" if stats.tools == "template" else
                                     "plain text: <tool_call> / <tool_response> tags (the template has no tool support)"))
    if stats.reasoning:
        lines.append("reasoning " + (f"the template's {stats.reasoning!r} field" if stats.reasoning != "dropped"
                                     else "dropped (the template has no thinking field)"))
    if stats.placeholders:
        lines.append("fill      " + ", ".join(f"{{{{{n}}}}} in {rows} rows: " + (repr(stats.filled[n]) if n in stats.filled
                                                else "not filled") for n, rows in stats.placeholders.items()))
    lines += [f"warning   {w}" for w in stats.warnings]
    return "\n".join(lines)

