"""LoRA Garage's engine. Importing it stays cheap: heavy libraries load inside the functions that use them."""

import time

# When this process began importing core: the start-up timeline's "spawn" phase ends and "imports" begins here
# (core.train.startup). First, before anything else is imported.
STARTED_AT = time.time()
STARTED_CPU = time.process_time()  # the CPU seconds this process had spent by then (the interpreter's start-up)

import logging  # noqa: E402 - after STARTED_AT, which must be taken first


class _OptionalKernelNotice(logging.Filter):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
    at import on CPUs with AVX512-BF16. It is an optional hub-downloaded kernel (the hub is not used here) and
    bitsandbytes falls back to its own; printed by every command it reads like an error to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())
