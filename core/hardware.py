"""What this machine has: NVIDIA GPUs (through NVML, the library behind nvidia-smi), RAM and CPU.

`read()` is cheap enough to poll every few seconds and never raises: NVML is initialised once and its device
handles cached; a machine without the NVIDIA driver gets a reading that says so. psutil's cpu_percent is
non-blocking (the share since the previous call). Memory is in bytes; sizes shown to users are in GiB,
labelled "GB" as GPU vendors and nvidia-smi size cards.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field

_GIB = 1024 ** 3
NO_GPU = "no NVIDIA GPU found"


@dataclass
class GpuReading:
    """One GPU as NVML sees it now."""
    index: int
    name: str
    total: int                       # bytes (what the driver reports; v2 memory info where available)
    free: int                        # bytes a new allocation can get now
    used: int                        # bytes in use, not counting memory the driver reserves for itself
    util: int | None = None          # percent of time a kernel ran over the last sample period
    temp: int | None = None          # degrees C
    other_procs_used: int | None = None  # bytes used by processes other than this one (None: not reported)
    driver: str = ""

    def summary(self) -> str:
        parts = [self.name, f"{self.used / _GIB:.1f} / {self.total / _GIB:.1f} GB used"]
        if self.util is not None:
            parts.append(f"{self.util}%")
        if self.temp is not None:
            parts.append(f"{self.temp}°C")
        return " · ".join(parts)


@dataclass
class HardwareReading:
    """GPUs (empty when there is none: nvml_error says why), RAM and CPU."""
    gpus: list = field(default_factory=list)
    nvml_error: str | None = None
    ram_total: int = 0
    ram_available: int = 0
    cpu_count: int = 0
    cpu_percent: float | None = None

    def summary(self) -> str:
        if not self.gpus:
            return f"CPU only ({self.nvml_error or NO_GPU})"
        return " | ".join(g.summary() for g in self.gpus)

    def to_dict(self) -> dict:
        return asdict(self)


class _Nvml:
    """NVML initialised once per process; handles cached. The failure is remembered, not retried per poll."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ready = False
        self.error: str | None = None
        self.handles: list = []
        self.driver = ""

    def init(self):
        with self.lock:
            if self.ready or self.error:
                return
            try:
                import pynvml
            except ImportError:
                self.error = f"{NO_GPU} (the nvidia-ml-py package is not installed)"
                return
            try:
                pynvml.nvmlInit()
                self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
                self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
                self.ready = True
                if not self.handles:
                    self.error = f"{NO_GPU} (the NVIDIA driver sees no devices)"
            except Exception as e:  # noqa: BLE001 - no driver / no library: a reading, not a crash
                self.error = f"{NO_GPU} ({_nvml_reason(e)})"

    def reset(self):
        """Forget the cached state (tests; or after a driver reload)."""
        with self.lock:
            self.ready, self.error, self.handles, self.driver = False, None, [], ""


_NVML = _Nvml()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    low = text.lower()
    if "library not found" in low or "shared library" in low:
        return "the NVIDIA driver is not installed"
    if "driver not loaded" in low:
        return "the NVIDIA driver is not loaded"
    return f"NVML: {text}"


def _gpu(pynvml, index: int, handle, driver: str) -> GpuReading:
    name = _text(pynvml.nvmlDeviceGetName(handle))
    try:  # v2 reports the driver's own reservation separately, so `used` is what processes hold
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except Exception:  # noqa: BLE001 - older drivers: v1, whose `used` includes the reservation
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    reading = GpuReading(index=index, name=name, total=int(mem.total), free=int(mem.free), used=int(mem.used),
                         driver=driver)
    try:
        reading.util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001 - not supported on some boards: leave None
        pass
    try:
        reading.temp = int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    except Exception:  # noqa: BLE001
        pass
    reading.other_procs_used = _other_procs(pynvml, handle)
    return reading


def _other_procs(pynvml, handle) -> int | None:
    """Memory held by processes other than this one (compute and graphics), None when NVML cannot say."""
    me, seen, total = os.getpid(), set(), 0
    try:
        procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
        try:
            procs += list(pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
        except Exception:  # noqa: BLE001 - graphics list unsupported (e.g. datacenter boards)
            pass
    except Exception:  # noqa: BLE001
        return None
    for p in procs:
        if p.pid == me or p.pid in seen:
            continue
        seen.add(p.pid)
        if p.usedGpuMemory is None:   # Windows WDDM does not report per-process memory
            return None
        total += int(p.usedGpuMemory)
    return total


def read() -> HardwareReading:
    """GPUs, RAM and CPU now. Never raises; cheap after the first call."""
    import psutil

    vm = psutil.virtual_memory()
    out = HardwareReading(ram_total=int(vm.total), ram_available=int(vm.available),
                          cpu_count=psutil.cpu_count() or os.cpu_count() or 0,
                          cpu_percent=psutil.cpu_percent(interval=None))
    _NVML.init()
    if not _NVML.ready:
        out.nvml_error = _NVML.error or NO_GPU
        return out
    import pynvml

    for i, handle in enumerate(_NVML.handles):
        try:
            out.gpus.append(_gpu(pynvml, i, handle, _NVML.driver))
        except Exception as e:  # noqa: BLE001 - a GPU that fell off the bus: say so, keep the rest
            out.nvml_error = f"GPU {i}: {_nvml_reason(e)}"
    if not out.gpus and not out.nvml_error:
        out.nvml_error = _NVML.error or NO_GPU
    return out


def reset() -> None:
    """Forget NVML's cached state so the next read() initialises again."""
    _NVML.reset()
