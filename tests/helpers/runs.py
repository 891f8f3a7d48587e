import json
from pathlib import Path


def make_run(home: Path, source: Path, run_id: str = "r1", seed: int = 1, checkpoints: dict | None = None,
             dora: bool = False, quant: str = "lora", data: dict | None = None, model=None) -> Path:
    """A finished run folder as the runner leaves it: config.yaml, status.json, adapter/ (random non-zero LoRA B,
    so the adapter really changes the output), and checkpoints/checkpoint-N/ ({N: marked})."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.config import RunConfig, save_yaml

    run = home / "runs" / run_id
    run.mkdir(parents=True)
    torch.manual_seed(seed)
    base = model if model is not None else AutoModelForCausalLM.from_pretrained(source)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False, use_dora=dora))
    peft_model.save_pretrained(run / "adapter")
    for step, marked in (checkpoints or {}).items():
        ck = run / "checkpoints" / f"checkpoint-{step}"
        peft_model.save_pretrained(ck)
        if marked:
            (ck / "COMPLETE").write_text("")
    cfg = RunConfig()
    cfg.model.source = str(source)
    cfg.quant.method = quant
    for key, value in (data or {}).items():
        setattr(cfg.data, key, value)
    save_yaml(cfg, run / "config.yaml")
    (run / "status.json").write_text(json.dumps({
        "state": "completed", "pid": None, "started_at": "2025-01-01T00:00:00", "ended_at": "2025-01-01T00:01:00",
        "step": 10, "total_steps": 10, "error": None}))
    return run
