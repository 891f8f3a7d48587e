"""Child process for GGUF export (run as a script by core.gguf_tools.run_child, never imported by the app).

    convert MODEL_DIR OUT.gguf OUTTYPE [PRE]   llama.cpp's convert_hf_to_gguf.py, with its own gguf-py first on
                                               PYTHONPATH (set by the parent). PRE: the llama.cpp pre-tokenizer
                                               name to use when the converter does not recognise the tokenizer's
                                               hash; the parent passes "gpt-2" only for a plain byte-level BPE,
                                               whose pre-tokenizer is GPT-2's regex exactly.
    quantize IN.gguf OUT.gguf TYPE             llama_cpp.llama_model_quantize (llama.cpp's C++ quantizer)
    serve IN.gguf N_CTX                        llama.cpp's runtime on one GGUF, asked over stdin/stdout (one JSON
                                               request per line; each answer is one line starting with "@@ "):
                                               meta, tokenize, logits (written to a .npy), generate, close. It
                                               runs here, not in the app: a crash in llama.cpp's C++ ends this
                                               process, and the parent says so, instead of taking the app down.
"""

import json
import os
import sys

# run as a script, this file's folder (core/) is first on sys.path, and its module names (config, data, models...)
# would shadow the converter's imports
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def convert(model_dir: str, out: str, outtype: str, pre: str = "") -> None:
    import convert_hf_to_gguf
    from conversion import base

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
    import llama_cpp

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
    import llama_cpp
    import llama_cpp.llama_cpp as low

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


def serve(path: str, n_ctx: str) -> None:
    import numpy as np

    llm = open_llama(path, n_ctx=int(n_ctx), logits_all=True, verbose=False, seed=0,
                     n_threads=max(1, (os.cpu_count() or 2) // 2))

    def piece(tid) -> str:
        return "" if tid is None else llm.detokenize([int(tid)], special=True).decode("utf-8", "replace")

    for line in sys.stdin:
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
                answer = {"text": choice["text"], "stopped": choice["finish_reason"] == "stop"}
            elif op == "close":
                break
            else:
                answer = {"error": f"unknown op {op}"}
        except Exception as e:   # the parent raises it with the request named: one line, nothing swallowed
            answer = {"error": f"{type(e).__name__}: {e}"}
        print("@@ " + json.dumps(answer), flush=True)
    llm.close()


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
