"""Several processes through torch.distributed.run, on the CPU over gloo (real DDP: two ranks, one all-reduce per
step): the plan, the launch by the real runner, rank 0 alone writing the run folder, loss parity with one process
at the same global batch, Stop as one decision, a dying rank named, two "machines" on loopback, and the per-GPU
estimate with the strategy `auto` picks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from core.train import distributed
from core.runs import procs
from core.runs import folder as runs
from core import events as ev
from core.config import RunConfig
from core.errors import ConfigError
from tests.helpers.net import free_port
from tests.helpers.shapes import LLAMA31_8B as LLAMA_8B
from tests.helpers.training import Launch, check_adapter_reloads, losses, tiny_config, write_dataset

pytestmark = pytest.mark.integration

GiB = 2**30
# Two ranks and one process see the same examples per optimizer step in the same order; what differs is the order
# of floating-point sums (the all-reduce vs one accumulation). Measured here: <= 1e-6 relative over 10 steps.
PARITY_RTOL = 1e-4


# ---------------------------------------------------------------- the plan

def _cfg(**train) -> RunConfig:
    cfg = RunConfig()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_the_plan_keeps_the_global_batch_and_says_how():
    p = distributed.plan(_cfg(devices="2", batch_size=2, grad_accum=4), gpu_count=0)
    assert (p.world_size, p.strategy, p.backend, p.gpus, p.grad_accum) == (2, "ddp", "gloo", None, 2)
    assert p.effective_batch == 8 and "stays 8" in p.notes[0]
    p = distributed.plan(_cfg(devices="2", batch_size=2, grad_accum=3), gpu_count=0)
    assert p.grad_accum == 2 and p.effective_batch == 8 and "cannot be divided evenly" in p.notes[0]
    assert distributed.plan(_cfg(), gpu_count=0).world_size == 1  # auto without GPUs: one CPU process
    p = distributed.plan(_cfg(), gpu_count=2)
    assert (p.world_size, p.strategy, p.backend, p.gpus) == (2, "ddp", "nccl", [0, 1])
    p = distributed.plan(_cfg(devices="1,3"), gpu_count=4)
    assert p.gpus == [1, 3] and p.world_size == 2


def test_auto_shards_a_16_bit_lora_that_does_not_fit_one_card_and_refuses_what_cannot_run():
    p = distributed.plan(_cfg(), gpu_count=2, fits_one=False, fits_sharded=lambda n: True)
    assert p.strategy == "fsdp" and "FSDP" in p.notes[0]
    qlora = _cfg()
    qlora.quant.method = "qlora"
    assert distributed.plan(qlora, gpu_count=2, fits_one=False).strategy == "ddp"  # 4-bit under FSDP: never auto
    qlora.train.strategy = "fsdp"
    assert any(n.startswith("experimental") for n in distributed.plan(qlora, gpu_count=2).notes)
    for cfg, gpus, field, words in [(_cfg(devices="3"), 2, "train.devices", "this machine has 2"),
                                    (_cfg(devices="0,1"), 0, "train.devices", "no NVIDIA GPU"),
                                    (_cfg(devices="2,5"), 4, "train.devices", "GPU 5 does not exist"),
                                    (_cfg(devices="2", strategy="single"), 0, "train.strategy", "single runs on one"),
                                    (_cfg(devices="2", strategy="fsdp"), 0, "train.strategy", "has none")]:
        with pytest.raises(ConfigError, match=words) as e:
            distributed.plan(cfg, gpu_count=gpus)
        assert e.value.field == field


def test_the_launcher_failure_summary_names_the_rank():
    text = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n====\ncore FAILED\n----\n"
            "Failures:\n  <NO_OTHER_FAILURES>\n----\nRoot Cause (first observed failure):\n[0]:\n"
            "  time      : 2026-11-29_15:40:00\n  host      : box\n  rank      : 1 (local_rank: 1)\n"
            "  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n  traceback : Signal 9 (SIGKILL) received by PID 4242\n")
    assert distributed.failed_rank(text) == (1, -9)
    assert distributed.failed_rank("all good") is None


def test_a_resume_on_another_number_of_processes_says_what_changed(tmp_path):
    from core.train import child as training

    distributed.record_plan(tmp_path, distributed.plan(_cfg(devices="2", batch_size=2, grad_accum=4), 0))
    log = ev.EventLog(tmp_path)
    one = distributed.plan(_cfg(devices="1", batch_size=2, grad_accum=4), 0)
    training._note_world_change(tmp_path, one, log)
    training._note_world_change(tmp_path, one, log)  # now recorded: quiet
    log.close()
    said = [e[ev.MESSAGE] for e in ev.logs(ev.read(tmp_path)[0])]
    assert len(said) == 1 and said[0].startswith("resuming on 1 process(es), the run started on 2")
    assert "effective batch is 8 (was 8)" in said[0] and "order of the examples" in said[0]


# ---------------------------------------------------------------- the per-GPU estimate

LLAMA_13B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
             "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False}


def _estimate_cli(tmp_path, config: dict, *args) -> dict:
    import io
    from contextlib import redirect_stdout

    from core.__main__ import main

    folder = tmp_path / f"m{abs(hash(json.dumps(config, sort_keys=True))) % 10**6}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["estimate", "--model", str(folder), "--seq-len", "2048", "--json", *args]) == 0
    return json.loads(out.getvalue())


def test_per_gpu_estimates_for_ddp_and_fsdp_on_an_8b_config(tmp_path):
    one = _estimate_cli(tmp_path, LLAMA_8B, "--method", "lora")
    ddp = _estimate_cli(tmp_path, LLAMA_8B, "--method", "lora", "--gpus", "2", "--strategy", "ddp")
    fsdp = _estimate_cli(tmp_path, LLAMA_8B, "--method", "lora", "--gpus", "2", "--strategy", "fsdp")
    assert ddp["strategy"] == "ddp" and ddp["gpus"] == 2
    # DDP: a whole replica per GPU, plus the gradient buckets
    assert ddp["total_bytes"] == one["total_bytes"] + one["components"]["gradients"]
    # FSDP: half the weights and adapter state, plus the gathered units; less than a DDP replica
    assert fsdp["components"]["weights"] < ddp["components"]["weights"]
    assert fsdp["components"]["optimizer"] == one["components"]["optimizer"] // 2
    assert fsdp["total_bytes"] < ddp["total_bytes"]


@pytest.mark.parametrize("config,args,want", [
    (LLAMA_8B, ["--method", "lora", "--gpu-gb", "24"], "single"),
    (LLAMA_8B, ["--method", "lora", "--gpus", "2", "--gpu-gb", "24", "--grad-checkpointing"], "ddp"),
    (LLAMA_8B, ["--method", "lora", "--gpus", "2", "--gpu-gb", "18", "--grad-checkpointing"], "fsdp"),
    (LLAMA_13B, ["--method", "qlora", "--gpus", "2", "--gpu-gb", "12", "--grad-checkpointing"], "ddp"),
])
def test_the_strategy_auto_picks_for_a_few_machines(tmp_path, config, args, want):
    out = _estimate_cli(tmp_path, config, *args)
    assert out["strategy"] == want, out["total_bytes"] / GiB


# ---------------------------------------------------------------- real runs: two ranks over gloo

def _two(model_dir, data, devices="2", **train):
    cfg = tiny_config(model_dir, data, **train)
    cfg.lora.dropout = 0.0  # per-rank dropout streams would differ from one process's
    cfg.train.devices = devices
    return cfg


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory, tiny_model_dir):
    """Started together: two ranks (reference), the same on one process, two ranks to stop and resume, QLoRA on
    two ranks, and two ranks of which rank 1 will be killed."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_dataset(root / "identity.jsonl", n=32)
    same = dict(max_steps=10, grad_accum=2, save_steps=2)
    qlora = _two(tiny_model_dir, data, max_steps=3, grad_accum=2, save_steps=100)
    qlora.quant.method = "qlora"
    specs = {
        "two": (_two(tiny_model_dir, data, **same), {"LORA_GARAGE_TEST_PROBE": "1"}),
        "one": (_two(tiny_model_dir, data, devices="1", **same), {}),
        "qlora": (qlora, {}),
        "kill": (_two(tiny_model_dir, data, max_steps=100_000, save_steps=50_000, lr=1e-4), {}),
    }
    launched = {name: Launch(root / f"home-{name}", c, env) for name, (c, env) in specs.items()}
    # started by its test, once the others are under way: it must still be running when Stop comes
    # slowed (LORA_GARAGE_FAULT slow@step1: the numbers are untouched) so a fast machine cannot finish first
    launched["stop"] = lambda: Launch(root / "home-stop", _two(tiny_model_dir, data, **same),
                                      {"LORA_GARAGE_FAULT": "slow@step1"})
    yield launched
    from core.runs import runner

    for run in launched.values():
        if callable(run):
            continue
        with run.environ():
            if runs.read_status(run.run_dir)["state"] in runs.ACTIVE:
                runner.stop(run.run_id, grace_s=5)


def _wait_for_step(run, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = ev.metrics(ev.read(run.run_dir)[0])
        if m and m[-1][ev.STEP] >= step:
            return
        if runs.read_status(run.run_dir, reconcile=False)["state"] in runs.TERMINAL:
            raise AssertionError(f"ended before step {step}:\n{runs.tail_log(run.run_dir, 40)}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {timeout} s:\n{runs.tail_log(run.run_dir, 40)}")


def test_two_ranks_train_like_one_process_and_rank_0_alone_writes(group_runs):
    two, one = group_runs["two"], group_runs["one"]
    st = two.wait()
    assert st["state"] == "completed", runs.tail_log(two.run_dir, 60)
    assert one.wait()["state"] == "completed", runs.tail_log(one.run_dir, 60)
    events, _ = ev.read(two.run_dir)
    steps = [e[ev.STEP] for e in events if e.get(ev.TYPE) == ev.METRICS]
    assert steps == list(range(1, 11))  # one line per step: nothing from rank 1
    assert "2 CPU processes, strategy ddp, effective batch 4" in runs.tail_log(two.run_dir, 400)
    a, b = losses(two.run_dir), losses(one.run_dir)
    worst = max(abs(a[k] - b[k]) / abs(b[k]) for k in b)
    print(f"\ntwo ranks vs one process, 10 steps: worst relative loss difference {worst:.2e}")
    assert worst <= PARITY_RTOL, (a, b)
    mem = ev.metrics(events)[-1][ev.MEM]
    assert len(mem[ev.MEM_RANKS]) == 2 and all(m[ev.MEM_RSS] > 0 for m in mem[ev.MEM_RANKS])
    from ui import plots

    frame = plots.memory_frame(events, runs.estimate_bytes(two.run_dir))
    assert {"process RSS (CPU)", "rank 1: process RSS (CPU)", "estimate"} == set(frame.series)
    assert [p.name for p in runs.checkpoints(two.run_dir)] == ["checkpoint-8", "checkpoint-10"]
    for ck in runs.checkpoints(two.run_dir):
        assert (ck / runs.COMPLETE).is_file() and (ck / "rng_state_1.pth").is_file()  # rank 1's part is there
    assert sorted(p.name for p in (two.run_dir / "ranks" / "logs").rglob("stderr.log").__iter__()
                  ) == ["stderr.log", "stderr.log"]  # a log per rank
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(runs.load_config(two.run_dir).model.source), dtype=torch.float32)
    check_adapter_reloads(two.run_dir, base)


def test_qlora_trains_on_two_ranks(group_runs):
    run = group_runs["qlora"]
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 60)
    assert [m[ev.STEP] for m in ev.metrics(ev.read(run.run_dir)[0])] == [1, 2, 3]
    assert (run.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_stop_is_one_decision_and_resume_continues_like_an_uninterrupted_run(group_runs):
    from core.runs import runner

    ref = group_runs["two"]
    run = group_runs["stop"] = group_runs["stop"]()
    _wait_for_step(run, 1)
    with run.environ():
        assert runner.stop(run.run_id, grace_s=120) == "stopped"
    st = runs.read_status(run.run_dir, reconcile=False)
    assert st["state"] == "stopped" and st["error"] is None, runs.tail_log(run.run_dir, 60)
    latest = runs.latest_checkpoint(run.run_dir)
    assert latest is not None and (latest / runs.COMPLETE).is_file()
    stopped_at = runs.checkpoint_step(latest)
    assert stopped_at < 10
    run.resume()
    assert run.wait()["state"] == "completed", runs.tail_log(run.run_dir, 60)
    assert ref.wait()["state"] == "completed"
    a, b = losses(run.run_dir), losses(ref.run_dir)
    assert list(a) == list(range(1, 11))
    worst = max(abs(a[k] - b[k]) / abs(b[k]) for k in b)
    print(f"\nstopped at step {stopped_at}, resumed: worst relative loss difference vs uninterrupted {worst:.2e}")
    assert worst <= PARITY_RTOL, (stopped_at, a, b)


def test_a_rank_that_dies_fails_the_run_naming_it_and_leaves_no_process(group_runs):
    run = group_runs["kill"]
    _wait_for_step(run, 1)
    pids = [int(distributed.pid_file(run.run_dir, r).read_text()) for r in (0, 1)]
    pids.append(runs.read_status(run.run_dir, reconcile=False)["pid"])
    # start times taken while all three live: a process that ends between two looks is gone, not an error,
    # and a reused pid is not mistaken for one of ours
    started = {p: procs.process_start_time(p) for p in pids}
    os.kill(pids[1], signal.SIGKILL)
    st = run.wait()
    assert st["state"] == "failed", st
    assert st["error"]["message"].startswith("rank 1 ended (killed by SIGKILL)"), st["error"]
    deadline = time.time() + 60
    while time.time() < deadline and any(procs.is_alive(p, started[p]) for p in pids):
        time.sleep(0.5)
    left = [p for p in pids if procs.is_alive(p, started[p])]
    assert not left, left


def test_two_machines_on_loopback_train_to_the_end(tmp_path, tiny_model_dir):
    """Two launchers of one process each (torchrun's static rendezvous on 127.0.0.1), as two machines would."""
    from core import config as C

    data = write_dataset(tmp_path / "d.jsonl", n=16)
    cfg = _two(tiny_model_dir, data, devices="1", max_steps=3, save_steps=100)
    (tmp_path / "run.yaml").write_text(C.dump_yaml(cfg))
    rdzv = f"127.0.0.1:{free_port()}"
    procs_ = []
    for k in (0, 1):
        home = tmp_path / f"node{k}"
        home.mkdir()
        env = dict(os.environ, LORA_GARAGE_HOME=str(home), OMP_NUM_THREADS="1")
        procs_.append(subprocess.Popen([sys.executable, "-m", "core", "train", "--config", str(tmp_path / "run.yaml"),
                                        "--nnodes", "2", "--node-rank", str(k), "--rdzv", rdzv],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs_]
    assert [p.returncode for p in procs_] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    run0 = next((tmp_path / "node0" / "runs").iterdir())
    assert [m[ev.STEP] for m in ev.metrics(ev.read(run0)[0])] == [1, 2, 3]
    assert (run0 / "adapter" / "adapter_model.safetensors").is_file()
    assert "2 CPU processes" in (run0 / "train.log").read_text()
