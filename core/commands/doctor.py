"""`python -m core doctor`: what LoRA Garage sees on this machine. Never a traceback: each check reports its own
failure as a line."""

import json
import platform
import shutil
import sys

from core import paths
from core.units import GiB
from core import hardware
from core import models


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _check(fn):
    """Run one check; a failure becomes its reading, with the exception's type and text (not swallowed)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported to the user as the result of this check
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _torch():
    import torch  # heavy

    cuda = torch.cuda.is_available()
    device = hardware.pick_device()
    out = {"ok": True, "version": torch.__version__, "cuda": cuda, "cuda_version": torch.version.cuda,
           "mps": hardware.mps_available(), "device": device, "device_name": hardware.device_name(device)}
    if cuda:
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["bf16"] = torch.cuda.is_bf16_supported()
    out["threads"] = torch.get_num_threads()
    return out


def _bnb():
    import bitsandbytes as bnb  # heavy
    import torch  # heavy
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit  # heavy

    device = hardware.pick_device()
    x = torch.randn(64, 64, device=device)
    q, state = quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    err = (dequantize_4bit(q, state) - x).abs().mean().item()
    return {"ok": err < 0.2, "version": bnb.__version__, "4bit_on": device, "nf4_mean_abs_error": round(err, 4)}


def _gpus():
    r = hardware.read()
    return {"ok": True, "summary": r.summary(), "nvml_error": r.nvml_error,
            "gpus": [{"index": g.index, "name": g.name, "total_gb": round(g.total / GiB, 2),
                      "free_gb": round(g.free / GiB, 2), "driver": g.driver} for g in r.gpus],
            "ram_total_gb": round(r.ram_total / GiB, 1), "ram_available_gb": round(r.ram_available / GiB, 1),
            "cpu_count": r.cpu_count, "apple_gpu": r.apple_gpu}


def _home():
    home = paths.home()
    free = shutil.disk_usage(home).free
    return {"ok": free > 5 * GiB, "path": str(home), "free_disk_gb": round(free / GiB, 1)}


def _builtin():
    return {"ok": True, "gguf": str(models.builtin_gguf()),
            "converted": models.builtin_converted(), "folder": str(models.builtin_folder())}


def collect() -> dict:
    return {
        "python": {"ok": True, "version": platform.python_version(), "executable": sys.executable},
        "torch": _check(_torch),
        "bitsandbytes": _check(_bnb),
        "hardware": _check(_gpus),
        "home": _check(_home),
        "builtin_model": _check(_builtin),
    }


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t, b, h, home, bi = (report[k] for k in ("torch", "bitsandbytes", "hardware", "home", "builtin_model"))
    print(f"Python        {report['python']['version']} ({report['python']['executable']})")
    if t.get("ok"):
        if t["cuda"]:
            dev = f"CUDA {t['cuda_version']}: {', '.join(t['devices'])}"
        elif t["mps"]:
            dev = f"MPS: {t['device_name']} (no CUDA device)"
        else:
            dev = "CPU only (no CUDA or Apple GPU)"
        print(f"torch         {t['version']}  {dev}  threads={t['threads']}")
        print(f"device        training, chat and eval use {t['device_name']} (train.device=auto)")
    else:
        print(f"torch         NOT WORKING: {t['error']}")
    if b.get("ok"):
        print(f"bitsandbytes  {b['version']}  4-bit NF4 works on {b['4bit_on']} (mean abs error {b['nf4_mean_abs_error']})")
    else:
        print(f"bitsandbytes  4-bit NOT WORKING: {b.get('error', b)}  -> QLoRA and 8-bit optimizers are unavailable")
    if h.get("ok"):
        if h["gpus"]:
            for g in h["gpus"]:
                print(f"GPU {g['index']}         {g['name']}  {g['free_gb']:.1f} GB free of {g['total_gb']:.1f} GB  driver {g['driver']}")
        elif h.get("apple_gpu"):
            print(f"GPU           {h['apple_gpu']} GPU (MPS): shares the {h['ram_total_gb']} GB of RAM with the system")
        else:
            print(f"GPU           {h['nvml_error'] or 'no NVIDIA GPU'}; training runs on the CPU, slowly")
        print(f"RAM           {h['ram_available_gb']} GB available of {h['ram_total_gb']} GB, {h['cpu_count']} CPU cores")
    else:
        print(f"hardware      could not read: {h['error']}")
    if home.get("ok") or "path" in home:
        warn = "" if home["ok"] else "  (low: runs and checkpoints need space)"
        print(f"home          {home['path']}  {home['free_disk_gb']} GB free{warn}")
    else:
        print(f"home          NOT USABLE: {home['error']}")
    if bi.get("ok"):
        state = "converted" if bi["converted"] else "not converted yet (first use takes ~1 min)"
        print(f"built-in      SmolLM2-135M-Instruct: {state}")
    else:
        print(f"built-in      NOT AVAILABLE: {bi['error']}")
    return 0
