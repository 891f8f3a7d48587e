"""The training child on a CUDA GPU: bf16 LoRA and 4-bit QLoRA report GPU memory, and a real out-of-memory error
ends as a clear `failed`. Skipped without CUDA (CI has none); run them where a GPU is lent."""

import json

import pytest

from core import events as ev
from core.runs import runner
from core.runs import folder as runs
from tests.helpers.training import losses, tiny_config, wait_until_done, write_dataset

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(cfg) -> tuple:
    run_id = runner.start(cfg)
    run_dir = runs.get(run_id)
    return run_dir, wait_until_done(run_dir, timeout=300)


@pytest.mark.parametrize("method", ["lora", "qlora", "8bit"])
def test_trains_on_the_gpu_and_reports_gpu_memory(method, tmp_path, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"), max_steps=6,
                      optimizer="paged_adamw_8bit" if method == "8bit" else "adamw")
    cfg.quant.method = method
    run_dir, st = _train(cfg)
    assert st["state"] == "completed", runs.tail_log(run_dir, 60)
    curve = losses(run_dir)
    assert curve[6] < curve[1], curve
    events, _ = ev.read(run_dir)
    mem = ev.metrics(events)[-1][ev.MEM]
    assert 0 < mem[ev.MEM_TORCH_PEAK_ALLOCATED] <= mem[ev.MEM_TORCH_PEAK_RESERVED], mem
    # the process total (NVML) includes the CUDA context: more than torch's own reserve
    assert mem[ev.MEM_GPU_PEAK] > mem[ev.MEM_TORCH_PEAK_RESERVED], mem
    estimate = json.loads((run_dir / "estimate.json").read_text())
    assert estimate["measured_context_bytes"] > 100 * 2**20, estimate  # a CUDA context is hundreds of MB
    assert not any(e.get("level") == "warning" and "CPU" in e.get("message", "") for e in events)
    log = (run_dir / "train.log").read_text()
    if method == "lora":
        assert "bfloat16 base, compute in bfloat16, on cuda" in log or "float16 base" in log
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_real_out_of_memory_error_names_the_first_step(tmp_path, tiny_model_dir):
    """A batch far beyond any GPU's memory: 512 rows of ~8k tokens with eager attention (the seq x seq score
    matrix alone is hundreds of GB)."""
    import json

    row = {"messages": [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok " * 900}]}
    data = tmp_path / "long.jsonl"
    data.write_text((json.dumps(row) + "\n") * 512)
    cfg = tiny_config(tiny_model_dir, data, max_steps=2, batch_size=512, grad_accum=1)
    cfg.data.max_len = 16384
    cfg.lora.targets = "all-linear"
    cfg.model.attn_implementation = "eager"  # materialises the seq x seq attention matrix: a sure OOM
    run_dir, st = _train(cfg)
    assert st["state"] == "failed", runs.tail_log(run_dir, 60)
    err = st["error"]
    assert err["kind"] == "oom", err
    assert err["message"].startswith("out of GPU memory during first step"), err
    assert "train.batch_size=1" in err["hint"] and "data.max_len=8192" in err["hint"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_train_with_ddp_and_fsdp(strategy, tmp_path, tiny_model_dir):
    """The multi-GPU path over NCCL, where two GPUs are lent: both strategies complete and rank 0 alone writes."""
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"), max_steps=4, grad_accum=2)
    cfg.train.devices, cfg.train.strategy = "2", strategy
    run_dir, st = _train(cfg)
    assert st["state"] == "completed", runs.tail_log(run_dir, 80)
    assert [m[ev.STEP] for m in ev.metrics(ev.read(run_dir)[0])] == [1, 2, 3, 4]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert f"strategy {strategy}" in runs.tail_log(run_dir, 400)
