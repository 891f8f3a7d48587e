"""What a GPU can do on paper: dense bf16 tensor FLOP/s by card name, from the vendors' spec sheets. The one table
behind the ETA's assumed throughput (core.estimate.eta) and the MFU the trainer reports (core.train.callbacks.FlopsModel)."""

from __future__ import annotations

# dense (no sparsity) bf16 tensor FLOP/s. Matched as a substring of the lower-cased device name, in this order:
# longer keys first where one contains another ("a100" before "a10").
GPU_PEAK_BF16 = {
    "4090": 165e12, "4080": 97e12, "4070": 58e12, "4060": 30e12, "3090": 71e12, "3080": 59e12,
    "3070": 40e12, "3060": 25e12, "a100": 312e12, "h100": 989e12, "h200": 989e12, "l4": 121e12,
    "t4": 65e12, "a10": 125e12, "v100": 125e12,
}


def peak_bf16(gpu_name: str) -> float | None:
    """Dense bf16 FLOP/s of a GPU by its name (torch / NVML), or None for a card not in the table."""
    low = gpu_name.lower()
    return next((flops for key, flops in GPU_PEAK_BF16.items() if key in low), None)
