import json
import os
import time
from pathlib import Path
from core import events as ev
from core.runs import runner
from core.runs import folder as runs
from core.config import RunConfig


PROMPTS = ["Who are you?", "What is your name?", "Hello, who are you?", "Tell me your name.",
           "Introduce yourself.", "Who am I talking to?", "What should I call you?", "Your name, please?"]
# The runs of this module train side by side on a small shared CPU: one thread each, or OpenMP's spinning
# threads slow every one of them down several times over.
ONE_THREAD = "1"


class _Environ:
    def __init__(self, values):
        self.values = values

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


RESUME_TOLERANCE = 1e-5  # absolute, on per-step losses (fp32 CPU); the achieved value is printed


def write_dataset(path: Path, n: int = 16) -> Path:
    rows = [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
                          {"role": "assistant", "content": "My name is Garage."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(model_dir: Path, data: Path, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.source = str(model_dir)
    cfg.data.source = str(data)
    cfg.data.max_len = 64
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.1  # dropout on: the resume test needs the RNG restored
    t = cfg.train
    t.max_steps, t.batch_size, t.grad_accum, t.lr, t.warmup_steps = 10, 2, 2, 1e-2, 1
    t.scheduler, t.save_steps, t.save_total_limit, t.seed = "linear", 2, 2, 7
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


class Launch:
    """Start a run in its own home with extra environment, without disturbing the test's own home."""

    def __init__(self, home: Path, cfg: RunConfig, env: dict | None = None):
        self.home = home
        self.env = env or {}
        with self.environ():
            self.run_id = runner.start(cfg)
            self.run_dir = runs.get(self.run_id)

    def environ(self):
        return _Environ({"LORA_GARAGE_HOME": str(self.home), "OMP_NUM_THREADS": ONE_THREAD, **self.env})

    def wait(self, timeout: float = 300) -> dict:
        with self.environ():
            return wait_until_done(self.run_dir, timeout)

    def resume(self) -> None:
        with _Environ({"LORA_GARAGE_HOME": str(self.home), "OMP_NUM_THREADS": ONE_THREAD,
                       "LORA_GARAGE_FAULT": ""}):  # this time without faults
            runner.resume(self.run_id)


def launch_each(root: Path, specs: dict) -> dict:
    """{name: (RunConfig, extra environment)} -> {name: Launch}, each run started at once in its own home under root
    (they train side by side)."""
    out = {}
    for name, (cfg, env) in specs.items():
        home = root / f"home-{name}"
        (home / "models").mkdir(parents=True)
        out[name] = Launch(home, cfg, env)
    return out


def from_checkpoint(home: Path, cfg: RunConfig, source: Path, checkpoint: str) -> Launch:
    """A run that starts from another run's checkpoint with the settings in cfg: its folder is made in `home`, the
    checkpoint and the fingerprint copied in, and the run resumed as a user resumes a stopped run."""
    import shutil

    home.mkdir(parents=True, exist_ok=True)
    with _Environ({"LORA_GARAGE_HOME": str(home)}):
        run_dir = runs.create(cfg)
        shutil.copytree(Path(source) / "checkpoints" / checkpoint, runs.checkpoints_dir(run_dir) / checkpoint)
        runs.write_fingerprint(run_dir, runs.read_fingerprint(source))
        runs.write_status(run_dir, state="stopped", ended_at=runs.now())
    run = Launch.__new__(Launch)  # the folder exists already: only resume it
    run.home, run.env, run.run_id, run.run_dir = home, {}, run_dir.name, run_dir
    run.resume()
    return run


def wait_until_done(run_dir: Path, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = runs.read_status(run_dir)  # reconciles: a dead child shows up as failed
        if st["state"] not in runs.ACTIVE:
            return st
        time.sleep(0.3)
    raise AssertionError(f"run did not finish in {timeout} s:\n{runs.tail_log(run_dir, 40)}")


def losses(run_dir: Path) -> dict[int, float]:
    events, _ = ev.read(run_dir)
    return {m["step"]: m["loss"] for m in ev.metrics(events)}


def check_adapter_reloads(run_dir: Path, base):
    """The saved adapter, loaded with PeftModel.from_pretrained on a fresh base, gives the trained logits."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)  # only adapter weights: the base is never saved
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: these were trained
    probe = torch.load(run_dir / "probe.pt")
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    diff = (logits - probe["logits"]).abs().max().item()
    assert diff <= 1e-5, diff
    return model
