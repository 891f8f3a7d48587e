"""What this machine has: NVIDIA GPUs (through NVML, the library behind nvidia-smi), an Apple Silicon GPU, RAM and CPU,
and the one device picker (cuda, then mps, then cpu; train.device overrides) that training, chat, eval and doctor use.

`read()` is cheap enough to poll every few seconds and never raises: NVML is initialised once and its device
handles cached; a machine without the NVIDIA driver gets a reading that says so. psutil's cpu_percent is
non-blocking (the share since the previous call). Memory is in bytes; sizes shown to users are in GiB,
labelled "GB" as GPU vendors and nvidia-smi size cards.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field

import psutil
import time
from core.units import GiB, gb
from core import events as ev
from core.config import DEVICE_KINDS
from core.errors import ConfigError

NO_GPU = "no NVIDIA GPU found"
DEVICES = DEVICE_KINDS  # train.device
MPS_RAM_MARGIN = 0.25  # share of a Mac's RAM left to macOS and the app when the GPU shares it (estimator verdict)


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
        parts = [self.name, f"{self.used / GiB:.1f} / {gb(self.total)} used"]
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
    apple_gpu: str | None = None     # "Apple M2 Pro" on an Apple Silicon Mac: its GPU shares the RAM (MPS)

    def summary(self) -> str:
        if not self.gpus and self.apple_gpu:
            return f"{self.apple_gpu} GPU (MPS, shares the {gb(self.ram_total)} of RAM)"
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
                import pynvml  # optional
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

    vm = psutil.virtual_memory()
    out = HardwareReading(ram_total=int(vm.total), ram_available=int(vm.available),
                          cpu_count=psutil.cpu_count() or os.cpu_count() or 0,
                          cpu_percent=psutil.cpu_percent(interval=None), apple_gpu=apple_gpu())
    _NVML.init()
    if not _NVML.ready:
        out.nvml_error = _NVML.error or NO_GPU
        return out
    import pynvml  # optional

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
    _APPLE.clear()


# ---------------------------------------------------------------- Apple Silicon and the device picker

_APPLE: dict = {}  # the chip's name, read once


def apple_gpu() -> str | None:
    """The Apple Silicon chip ("Apple M2 Pro") whose GPU PyTorch reaches as "mps", or None off an arm64 Mac.
    Read once from sysctl (no torch: the hardware bar polls this)."""
    if "name" not in _APPLE:
        name = None
        if sys.platform == "darwin" and platform.machine() == "arm64":
            try:
                name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                      timeout=5).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                name = None
            name = name or "Apple Silicon"
        _APPLE["name"] = name
    return _APPLE["name"]


def mps_available() -> bool:
    """PyTorch can use the Apple GPU (a torch built with MPS, on macOS 12.3+ on Apple Silicon)."""
    import torch  # heavy

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(requested: str = "auto") -> str:
    """The device a model runs on: cuda when PyTorch sees an NVIDIA GPU, else mps on an Apple Silicon Mac, else
    cpu. `requested` (train.device) picks one instead; ConfigError naming train.device when it is not there."""
    import torch  # heavy

    if requested not in DEVICES:
        raise ConfigError("train.device", f"{requested!r} is not one of {', '.join(DEVICES)}",
                          "use auto (cuda, then mps, then cpu)")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise ConfigError("train.device", "cuda was asked for but PyTorch sees no CUDA GPU",
                          "run python -m core doctor; install the CUDA build of torch, or use train.device=auto")
    if requested in ("auto", "mps") and mps_available():
        return "mps"
    if requested == "mps":
        raise ConfigError("train.device", "mps was asked for but PyTorch cannot use an Apple GPU here",
                          "MPS needs an Apple Silicon Mac with macOS 12.3 or newer; use train.device=auto")
    return "cpu"


def device_name(device: str) -> str:
    """The device as a user reads it: "CUDA (NVIDIA GeForce RTX 4090)", "MPS (Apple M2 Pro GPU)", "CPU"."""
    if device == "cuda":
        import torch  # heavy

        return f"CUDA ({torch.cuda.get_device_name(0)})"
    if device == "mps":
        return f"MPS ({apple_gpu() or 'Apple'} GPU)"
    return "CPU"


# ---------------------------------------------------------------- this process's GPU memory (training child)

def _torch_device_handle(pynvml):
    """NVML's handle for torch's current device, found by UUID: torch's device 0 is not NVML's device 0 when
    CUDA_VISIBLE_DEVICES reorders them."""
    import torch  # heavy

    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


def nvml_device_used(handle) -> int:
    import pynvml  # optional

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def nvml_process_used(handle, pid: int) -> int | None:
    """This process's memory on the device as the driver counts it (what nvidia-smi lists), or None where the
    driver does not say (a container's own pid namespace, no permission)."""
    import pynvml  # optional

    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        for p in query(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
    return None


def _create_cuda_context() -> None:
    import torch  # heavy

    torch.zeros(1, device="cuda")  # the context exists from here on
    torch.cuda.synchronize()


class GpuProcessMemory:
    """The training process's GPU memory, for the metrics events (core.events MEM_*). Made in the child before
    the model loads: it creates the CUDA context and measures it (NVML process memory then: context, cuBLAS and
    kernel images), which estimate.json records beside the estimate's assumed constant. Each reading has torch's
    own counters and the NVML process total; NVML is queried at most every `every_s` (a query costs ms), so the
    reported peak is the larger of the sampled NVML peak and torch's peak reserved plus the measured context."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.pid, self._time = every_s, os.getpid(), time.monotonic
        self.handle, self.nvml_error = None, None
        baseline = None
        try:
            import pynvml  # optional

            pynvml.nvmlInit()
            self.handle = _torch_device_handle(pynvml)
            baseline = nvml_device_used(self.handle)
        except Exception as e:  # noqa: BLE001 - no NVML reading: torch's counters still go into the events
            self.nvml_error = f"{type(e).__name__}: {e}"
        _create_cuda_context()
        self._baseline = baseline
        self.context_bytes = self._process(baseline)
        self.peak = self.context_bytes or 0
        self._last_t, self._last = -1e9, None

    def _process(self, baseline: int | None) -> int | None:
        if self.handle is None:
            return None
        try:
            used = nvml_process_used(self.handle, self.pid)
            if used is None and baseline is not None:  # no per-process figure: what the device gained since start
                used = max(nvml_device_used(self.handle) - baseline, 0)
            return used
        except Exception as e:  # noqa: BLE001 - reported in the event, never fatal to training
            self.nvml_error = f"{type(e).__name__}: {e}"
            return None

    def reading(self) -> dict:
        import torch  # heavy

        now = self._time()
        if now - self._last_t >= self.every_s:
            self._last_t, self._last = now, self._process(self._baseline)
        peak_reserved = int(torch.cuda.max_memory_reserved())
        mem = {ev.MEM_TORCH_RESERVED: int(torch.cuda.memory_reserved()), ev.MEM_TORCH_PEAK_RESERVED: peak_reserved,
               ev.MEM_TORCH_PEAK_ALLOCATED: int(torch.cuda.max_memory_allocated())}
        self.peak = max(self.peak, self._last or 0, peak_reserved + (self.context_bytes or 0))
        mem[ev.MEM_GPU_PEAK] = self.peak
        if self._last is not None:
            mem[ev.MEM_GPU_PROCESS] = self._last
        if self.nvml_error:
            mem[ev.MEM_NVML_ERROR] = self.nvml_error
        return mem


def process_rss_reading() -> dict:
    """The CPU run's memory for the metrics events: this process's resident set size."""

    return {ev.MEM_RSS: int(psutil.Process().memory_info().rss)}
