"""Child process for GGUF export (run as a script by core.gguf_tools.run_child, never imported by the app).

    convert MODEL_DIR OUT.gguf OUTTYPE [PRE]   llama.cpp's convert_hf_to_gguf.py, with its own gguf-py first on
                                               PYTHONPATH (set by the parent). PRE: the llama.cpp pre-tokenizer
                                               name to use when the converter does not recognise the tokenizer's
                                               hash; the parent passes "gpt-2" only for a plain byte-level BPE,
                                               whose pre-tokenizer is GPT-2's regex exactly.
    quantize IN.gguf OUT.gguf TYPE             llama_cpp.llama_model_quantize (llama.cpp's C++ quantizer)
"""

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


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "convert":
        convert(*rest)
    elif mode == "quantize":
        quantize(*rest)
    else:
        raise SystemExit(f"unknown mode {mode}")
