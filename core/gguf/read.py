"""Read what an exported GGUF holds with the gguf package we already use: metadata and the real bits per weight."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

_SKIP = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def metadata(path: Path) -> dict:
    """Scalar and string fields (the vocabulary arrays left out)."""
    import gguf  # heavy

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(_SKIP) or key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def weights(path: Path) -> dict:
    """{"bits_per_weight": all tensor bytes * 8 / all parameters, "types": {"Q4_K": n tensors, ...},
    "params": n, "bytes": file size}. The bits count what llama.cpp really stored, fallbacks included."""
    import gguf  # heavy

    reader = gguf.GGUFReader(str(path))
    n_bits = n_params = 0
    types: Counter = Counter()
    for t in reader.tensors:
        n_params += int(t.n_elements)
        n_bits += int(t.n_bytes) * 8
        types[t.tensor_type.name] += 1
    return {"bits_per_weight": round(n_bits / max(n_params, 1), 3), "types": dict(types.most_common()),
            "params": n_params, "bytes": Path(path).stat().st_size}
