"""`export --gguf DIR`: merge the adapter into its 16-bit base, convert with llama.cpp's own converter, quantize,
write an Ollama Modelfile and README.txt, and check that the GGUF answers like the adapter (core.gguf.parity).

Nothing is deleted when a parity check fails: export.json and the panel say exactly what differs. A failure while
writing (a full disk, a converter error) removes every file this export made and leaves DIR as it was.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from core.gguf import read as gguf_read
from core.gguf import tools as gguf_tools
from core.gguf import modelfile
from core.errors import DiskFull, GarageError
from core import export
from core.chat import GenSettings
from core.data import sft as data
from core.data import tokenize as data_tokenize
from core.gguf import parity as gguf_parity

Say = Callable[[str], None]


def export_gguf(run_id: str, out_dir: str | Path, quants: list[str] | None = None, checkpoint: int | None = None,
                say: Say | None = None, parity: bool = True) -> dict:
    """Write the GGUF export into `out_dir` (new or empty) and return what export.json holds."""

    say = say or (lambda m: None)
    quants = list(dict.fromkeys(q.lower() for q in (quants or ["q8_0"])))
    bad = [q for q in quants if q not in gguf_tools.QUANTS]
    if bad:
        raise GarageError(f"unknown --quant {bad[0]}", f"use one or more of: {', '.join(gguf_tools.QUANTS)}")
    src = export.source(run_id, checkpoint)   # refuses a run without an adapter, naming the fix
    out = export.fresh_target(Path(out_dir))
    needs_quantizer = [q for q in quants if q in gguf_tools.K_QUANTS]
    times: dict = {}
    t = time.monotonic()
    converter = gguf_tools.ensure_converter(say)
    if needs_quantizer:
        gguf_tools.ensure_quantizer(say)   # before any work: no compiler -> a clear error, nothing written
    times["tools"] = round(time.monotonic() - t, 1)

    created_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.run_dir.name).strip("-") or "model"
    work = out / ".work"
    try:
        info = _build(src, out, work, name, quants, converter, times, say, parity)
    except BaseException as e:
        _remove_partial(out, created_dir)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFull(f"the disk filled up while writing the GGUF export into {out}; the partial files were "
                           "removed", "free some disk space or export to another drive") from e
        if isinstance(e, DiskFull):
            raise DiskFull(f"{e.message}; the partial files in {out} were removed", e.hint) from e
        raise
    return info


def _build(src: export.Source, out, work, name, quants, converter, times, say, parity) -> dict:
    run_dir, cfg, adapter_dir, checkpoint, base_path = src.run_dir, src.cfg, src.adapter_dir, src.checkpoint, src.base_path
    _check_space(out, base_path, quants)
    t = time.monotonic()
    say("step 1/4: merging the adapter into the 16-bit base")
    done = export.merge_source(src, work / "merged", log=say)
    merged, tok, fallback = done.path, done.tokenizer, done.template_is_fallback
    notes = json.loads((merged / export.EXPORT_INFO).read_text())["notes"]
    times["merge"] = round(time.monotonic() - t, 1)

    say("step 2/4: converting with llama.cpp's convert_hf_to_gguf.py")
    files: dict = {}
    pre = _gpt2_pre_tokenizer(merged)
    t = time.monotonic()
    f16 = out / f"{name}-f16.gguf" if "f16" in quants else work / f"{name}-f16.gguf"
    gguf_tools.run_child(["convert", str(merged), str(f16), "f16", pre], converter, say, "converting to GGUF f16")
    if "f16" in quants:
        files["f16"] = f16
    times["convert_f16"] = round(time.monotonic() - t, 1)
    if "q8_0" in quants:
        t = time.monotonic()
        files["q8_0"] = out / f"{name}-q8_0.gguf"
        gguf_tools.run_child(["convert", str(merged), str(files["q8_0"]), "q8_0", pre], converter, say,
                             "converting to GGUF q8_0")
        times["convert_q8_0"] = round(time.monotonic() - t, 1)
    k_quants = [q for q in quants if q in gguf_tools.K_QUANTS]
    for k, q in enumerate(k_quants, 1):
        say(f"step 3/4: quantizing to {q} ({k} of {len(k_quants)}) with llama.cpp's quantizer")
        t = time.monotonic()
        files[q] = out / f"{name}-{q}.gguf"
        gguf_tools.run_child(["quantize", str(f16), str(files[q]), q], None, say, f"quantizing to {q}")
        times[f"quantize_{q}"] = round(time.monotonic() - t, 1)

    renderer = data_tokenize.Renderer(tok)
    template_src = renderer.template
    bos_text = tok.bos_token if tok.bos_token and "bos_token" in template_src else ""
    try:
        pieces = modelfile.probe(renderer.render, bos_text, tok.eos_token or "")
        go = modelfile.go_template(pieces)
        template_check = modelfile.check(go, pieces, renderer.render)
        template_note = ""
    except modelfile.TemplateNotExpressible as e:
        pieces, go, template_check = None, None, []
        template_note = (f"the Modelfile has no TEMPLATE: {e}; Ollama will use the template embedded in the GGUF "
                         "if it recognises it, check the first answers")
        notes.append(template_note)
    if fallback:   # the base had no chat template of its own
        notes.append("the base model has no chat template: the run trained with LoRA Garage's ChatML fallback, "
                     "which is embedded in the GGUF and written into the Modelfile")
    order = [q for q in ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16") if q in files]
    system = modelfile.system_prompt(cfg.data.system, pieces)
    for n, q in enumerate(order):
        text = modelfile.write(files[q].name, go, pieces, GenSettings(), system)
        (out / ("Modelfile" if n == 0 else f"Modelfile.{q}")).write_text(text)

    report = {"run": run_dir.name, "checkpoint": checkpoint, "base_model": cfg.model.source,
              "quant_method": cfg.quant.method, "converter": f"llama-cpp-python {gguf_tools.LLAMA_CPP_PYTHON} "
              f"(vendored llama.cpp, sdist sha256 {gguf_tools.SDIST_SHA256})", "notes": notes,
              "files": {q: {"file": p.name, **gguf_read.weights(p)} for q, p in files.items()},
              "modelfile": {"template_from": "LoRA Garage fallback" if fallback else "the model's own",
                            "checked_conversations": template_check,
                            "system": system, "stops": pieces.stops if pieces else []},
              "times_s": times, "parity": []}
    if parity:
        t = time.monotonic()
        say("step 4/4: parity check against base + adapter")
        report["parity"] = _parity(run_dir, cfg, base_path, tok, adapter_dir, files, order, data, say)
        times["parity"] = round(time.monotonic() - t, 1)
    shutil.rmtree(work)
    (out / "README.txt").write_text(readme(report, order))
    (out / "export.json").write_text(json.dumps(report, indent=2))
    return report


def _parity(run_dir, cfg, base_path, tok, adapter_dir, files, order, data, say) -> list[dict]:
    items = data.demo_eval_set(cfg.data.source)
    if not items:
        rows, _, _ = data.load_rows(cfg.data.source, cfg.data.format, cfg.data.columns or None, limit=8)
        items = []
        for conv in rows:
            cut = next((i for i, m in enumerate(conv) if m.get("role") == "assistant"), None)
            if cut:
                items.append({"messages": [{"role": m["role"], "content": m["content"]} for m in conv[:cut]]})
        if not items:
            raise GarageError("the run's dataset has no conversation with a prompt and a reply to check the export on",
                              "export with --no-check, or train on chat data")
    items = items[:20]
    ref = gguf_parity.reference(tok, base_path, adapter_dir, items, cfg.data.source, say)
    rows = []
    for k, q in enumerate(reversed(order), 1):
        say(f"parity: checking {q} ({k} of {len(order)} files)")
        row = gguf_parity.check(files[q], q, ref, say)
        say(gguf_parity.summary(row))
        rows.append(row)
    return rows


def _gpt2_pre_tokenizer(merged: Path) -> str:
    """'gpt-2' when the tokenizer's pre-tokenizer is exactly GPT-2's byte-level regex split (then llama.cpp's
    'gpt-2' pre-tokenizer is the same rule), for tokenizers whose hash llama.cpp does not list; else ''."""
    tj = merged / "tokenizer.json"
    if not tj.is_file():
        return ""
    pre = json.loads(tj.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
        and not pre.get("add_prefix_space") else ""


def _check_space(out: Path, base_path: Path, quants: list[str]) -> None:
    size = sum(f.stat().st_size for f in base_path.glob("*.safetensors"))
    # merged 16-bit + f16 GGUF + the quantized files (at most the f16 size each)
    need = int(size * (2 + 0.5 * len(quants))) + 50_000_000
    free = shutil.disk_usage(out).free
    if free < need:
        raise DiskFull(f"the GGUF export needs about {need / 1e9:.1f} GB, {out} has {free / 1e9:.1f} GB free",
                       "free some disk space or export to another drive")


def _remove_partial(out: Path, created_dir: bool) -> None:
    if created_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():   # the folder was empty before this export: everything in it is ours
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def readme(report: dict, order: list[str]) -> str:
    main = report["files"][order[0]]["file"]
    name = re.sub(r"[^a-z0-9-]+", "-", report["run"].lower()).strip("-") or "my-model"
    lines = [f"LoRA Garage export of run {report['run']} (base: {report['base_model']})", "",
             "Files:"]
    for q in order:
        f = report["files"][q]
        lines.append(f"  {f['file']}  {f['bytes'] / 1e6:.1f} MB, {f['bits_per_weight']} bits per weight "
                     f"({', '.join(f'{k}: {v}' for k, v in f['types'].items())} tensors)")
    lines += ["", "Ollama:", f"  ollama create {name} -f Modelfile", f"  ollama run {name}",
              "  (Modelfile uses " + main + "; Modelfile.<quant> use the others)", "",
              "llama.cpp:", f"  llama-cli -m {main} -cnv", f"  llama-server -m {main} --jinja", "",
              "LM Studio:", f"  lms import {main}   (or drag the .gguf into LM Studio's My Models)", ""]
    if report["parity"]:
        lines.append("Parity with the adapter (export.json has the details):")
        lines += [f"  {gguf_parity.summary(r)}" for r in report["parity"]]
    for n in report["notes"]:
        lines.append(f"Note: {n}")
    return "\n".join(lines) + "\n"
