"""Does the exported GGUF answer like the adapter did? Checked at the end of every GGUF export.

Reference: the base + adapter in transformers (float32, CPU), exactly as `core eval` chats. Exported model: the GGUF
loaded back with llama.cpp's runtime (llama-cpp-python) when installed, else with transformers' gguf_file= loader
(which dequantizes). On the run's eval prompts:
 (a) prompt: the GGUF's embedded chat template, rendered and tokenised by the GGUF side, gives token for token the
     ids we trained on (our template render, tokenised without added specials);
 (b) teacher-forced agreement: the adapter's greedy reply fed to both; per reply position, does the top-1 token
     match, and the largest logit difference. Thresholds per quant type below (greedy text equality is no test:
     near-ties flip under quantization);
 (c) the eval score with the dataset's checker (core.data.sft.score_answer) for the adapter and the GGUF, side by side,
     where the dataset has one (the built-in demo data);
 (d) stops: every prompt on which the adapter's reply ended with an end-of-turn token within the budget must end
     so on the GGUF too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import tempfile
from core.chat import END_OF_TURN
from core.data import sft as data
from core.data import tokenize as data_tokenize
from core.gguf import read as gguf_read
from core.gguf import tools as gguf_tools

# minimum top-1 agreement and maximum |logit difference| against base+adapter in float32. f16 differs by rounding
# only; q8_0 by 8-bit blocks; k-quants by 4-6 bit blocks (and Q5_0/Q8_0 for rows llama.cpp cannot k-quantize).
THRESHOLDS = {"f16": (0.98, 1.0), "q8_0": (0.95, 2.5), "q6_k": (0.93, 4.0), "q5_k_m": (0.90, 5.0),
              "q4_k_m": (0.85, 8.0)}
SCORE_MARGIN = 0.1          # the GGUF's eval score may be at most this far below the adapter's
BUDGET = 64                 # new tokens per reply, as `core eval`


@dataclass
class Reference:
    prompts: list            # [{"messages", "expected" | None, "ids", "reply_ids", "reply", "stopped", "logits"}]
    metric: str              # "accuracy" when the dataset has a checker, else ""
    source: str


def reference(tok, base_path: Path, adapter_dir: Path, items: list[dict], source: str, say) -> Reference:
    """Greedy replies and their teacher-forced logits from base + adapter (float32). `tok` is the merged model's
    tokenizer, which carries the run's chat template."""
    import torch  # heavy
    from peft import PeftModel  # heavy
    from transformers import AutoModelForCausalLM  # heavy

    renderer = data_tokenize.Renderer(tok)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    eos = _end_ids(tok)
    prompts = []
    say(f"parity: the adapter's replies to {len(items)} eval prompts")
    for k, item in enumerate(items, 1):
        say(f"parity: the adapter's reply {k} of {len(items)}")
        ids = tok(renderer.render(item["messages"], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=BUDGET, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos[0])[0, len(ids):].tolist()
            stopped = bool(out) and out[-1] in eos
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, len(ids) - 1:len(ids) + len(out) - 1]
        reply = tok.decode(out[:-1] if stopped else out, skip_special_tokens=True)
        prompts.append({"messages": item["messages"], "expected": item.get("expected"), "ids": ids,
                        "reply_ids": out, "reply": reply, "stopped": stopped, "logits": logits.float()})
    metric = "accuracy" if all(p["expected"] for p in prompts) and data.demo_eval_set(source) else ""
    return Reference(prompts=prompts, metric=metric, source=source)


def _end_ids(tok) -> list[int]:
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return list(dict.fromkeys(ids))


def check(gguf: Path, quant: str, ref: Reference, say) -> dict:
    """One GGUF file against the reference: the row of export.json's parity table."""
    if _has_llama_cpp():
        # the context llama.cpp reserves costs time on every token: the longest prompt and reply, not the model's max
        longest = max((len(p["ids"]) + max(len(p["reply_ids"]), BUDGET) for p in ref.prompts), default=0) + 8
        runtime = LlamaCppRuntime(gguf, n_ctx=256 * -(-longest // 256))
    else:
        runtime = TransformersRuntime(gguf)
    try:
        return _compare(runtime, quant, ref, say)
    finally:
        runtime.close()


def _compare(runtime, quant: str, ref: Reference, say) -> dict:
    import torch  # heavy

    same_prompt, agree, total, max_diff, same_answer, stops, ok_ad, ok_gg = 0, 0, 0, 0.0, 0, 0, 0, 0
    mismatches = []
    say(f"parity {quant}: {len(ref.prompts)} prompts on {runtime.name}")
    for k, p in enumerate(ref.prompts, 1):
        say(f"parity {quant}: prompt {k} of {len(ref.prompts)} on {runtime.name}")
        ids = runtime.prompt_ids(p["messages"])
        if ids == p["ids"]:
            same_prompt += 1
        elif len(mismatches) < 3:
            mismatches.append({"ours": p["ids"][:40], "gguf": ids[:40]})
        if p["reply_ids"]:
            logits = runtime.logits(p["ids"] + p["reply_ids"])[len(p["ids"]) - 1:len(p["ids"]) + len(p["reply_ids"]) - 1]
            v = min(logits.shape[-1], p["logits"].shape[-1])
            a, b = p["logits"][:, :v], torch.as_tensor(logits[:, :v], dtype=torch.float32)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            max_diff = max(max_diff, float((a - b).abs().max()))
        reply, stopped = runtime.generate(p["ids"])
        same_answer += int(reply.strip() == p["reply"].strip())
        stops += int(stopped or not p["stopped"])
        if ref.metric:
            ok_ad += bool(data.score_answer(ref.source, p["reply"], p["expected"]))
            ok_gg += bool(data.score_answer(ref.source, reply, p["expected"]))
    n = len(ref.prompts)
    min_agree, max_logit = THRESHOLDS[quant]
    top1 = agree / total if total else 1.0
    row = {"quant": quant, "runtime": runtime.name, "prompts": n, "prompt_tokens_same": same_prompt,
           "top1_agreement": round(top1, 4), "max_logit_diff": round(max_diff, 4),
           "threshold": {"top1_at_least": min_agree, "max_logit_diff_at_most": max_logit},
           "same_answer": same_answer, "stops": stops, "adapter_stops": sum(p["stopped"] for p in ref.prompts)}
    if ref.metric:
        row.update(score_adapter=ok_ad / n, score_gguf=ok_gg / n)
    problems = []
    if same_prompt < n:
        problems.append(f"the GGUF's template and tokenizer give different prompt tokens on {n - same_prompt}/{n} "
                        f"prompts (first ones: {mismatches})")
    if top1 < min_agree:
        problems.append(f"top-1 agreement {top1:.3f} is under {min_agree}")
    if max_diff > max_logit:
        problems.append(f"max logit difference {max_diff:.3f} is over {max_logit}")
    if stops < n:
        problems.append(f"{n - stops} replies did not end with an end-of-turn token within {BUDGET} tokens, "
                        "where the adapter's did")
    if ref.metric and ok_gg / n < ok_ad / n - SCORE_MARGIN:
        problems.append(f"eval score {ok_gg / n:.2f} is more than {SCORE_MARGIN} under the adapter's {ok_ad / n:.2f}")
    row["passed"], row["problems"] = not problems, problems
    return row


def summary(row: dict) -> str:
    """'q4_k_m: same answer on 19/20 eval prompts, score 0.95 vs 0.95, top-1 0.97, stops 20/20: passed'."""
    text = (f"{row['quant']}: same answer on {row['same_answer']}/{row['prompts']} eval prompts"
            + (f", score {row['score_gguf']:.2f} vs {row['score_adapter']:.2f}" if "score_gguf" in row else "")
            + f", top-1 agreement {row['top1_agreement']:.3f}, max logit diff {row['max_logit_diff']:.2f}, "
            f"prompt tokens same {row['prompt_tokens_same']}/{row['prompts']}, stops {row['stops']}/{row['prompts']}")
    return text + (": passed" if row["passed"] else ": FAILED: " + "; ".join(row["problems"]))


def _has_llama_cpp() -> bool:
    return gguf_tools.quantizer_installed()


class LlamaCppRuntime:
    """The GGUF in llama.cpp (in a child process, core.gguf.tools.LlamaChild): its own tokenizer, its embedded
    template rendered with jinja2 (as llama-cpp-python does), its logits and its end-of-generation tokens."""
    name = "llama.cpp"

    def __init__(self, gguf: Path, n_ctx: int = 1024):
        self.child = gguf_tools.LlamaChild(gguf, n_ctx, logits=True)
        self.scratch = tempfile.TemporaryDirectory(prefix="gguf-logits-")
        self.child.meta()   # loads the model now: a file llama.cpp cannot load fails before the first prompt

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.child.prompt_ids(messages)

    def logits(self, ids: list[int]):
        import numpy as np  # heavy

        out = self.child.ask("logits", ids=ids, out=str(Path(self.scratch.name) / "logits.npy"))["out"]
        return np.load(out)

    def generate(self, ids: list[int]) -> tuple[str, bool]:
        answer = self.child.ask("generate", ids=ids, max_tokens=BUDGET)
        return answer["text"], answer["stopped"]

    def close(self) -> None:
        self.child.close()
        self.scratch.cleanup()


class TransformersRuntime:
    """The GGUF through transformers' gguf_file= loader (dequantized to float32): used without llama.cpp."""
    name = "transformers gguf_file"

    def __init__(self, gguf: Path):
        import torch  # heavy
        from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy

        self.fields = gguf_read.metadata(gguf)
        self.tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        self.template = self.fields.get("tokenizer.chat_template", "")
        self.eog = [i for i in (self.fields.get("tokenizer.ggml.eos_token_id"),
                                self.fields.get("tokenizer.ggml.eot_token_id")) if i is not None]
        self.eog += [self.tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")
                     if t in self.tok.get_vocab()]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = gguf_tools.render_embedded(self.template, messages, self.tok.bos_token or "", self.tok.eos_token or "")
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = self.fields.get("tokenizer.ggml.bos_token_id")
        return ([bos] if bos is not None and self.fields.get("tokenizer.ggml.add_bos_token") else []) + ids

    def logits(self, ids: list[int]):
        import torch  # heavy

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float()

    def generate(self, ids: list[int]) -> tuple[str, bool]:
        import torch  # heavy

        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=BUDGET, do_sample=False,
                                      eos_token_id=self.eog, pad_token_id=self.eog[0])[0, len(ids):].tolist()
        stopped = bool(out) and out[-1] in self.eog
        return self.tok.decode(out[:-1] if stopped else out, skip_special_tokens=True), stopped

    def close(self) -> None:
        self.model = None
