"""core/train/allocator.py: a CPU run whose memory is tight trains lean, decided before the training process loads
anything; where the tbb wheel's tbbmalloc is installed the process starts itself again with it preloaded (the
same pid, files and lock), and the run says so in train.log."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.config import RunConfig
from core.estimate import vram
from core.train import allocator
from tests.helpers.training import Launch, tiny_config, write_dataset

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
ENV_KEYS = (allocator.ALLOCATOR_ENV, allocator.LEAN_MEMORY_ENV, "LD_PRELOAD", vram.LEAN_MLP_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    """prepare() writes os.environ: each key it may touch is put back after the test, and starts unset."""
    for k in ENV_KEYS + tuple(k for k in os.environ if k.startswith("MALLOC_")):
        monkeypatch.setenv(k, "x")  # recorded, so the teardown restores the original (or removes it)
        monkeypatch.delenv(k)
    execs = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: execs.append((exe, argv, env)))
    monkeypatch.setattr(allocator, "tbbmalloc_libs", lambda: [Path("/x/libtbbmalloc.so.2"),
                                                                Path("/x/libtbbmalloc_proxy.so.2")])
    monkeypatch.setattr(allocator, "active", lambda: None)
    return execs


def _ram(monkeypatch, gib: float):
    monkeypatch.setattr(allocator.psutil, "virtual_memory", lambda: SimpleNamespace(available=int(gib * GIB)))


def _bench_cfg(device="cpu") -> RunConfig:
    cfg = RunConfig()  # the built-in model at 8 x 512: the memory bench's step (estimate 6.17 GiB)
    cfg.train.batch_size, cfg.data.max_len, cfg.train.device, cfg.lora.dropout = 8, 512, device, 0.0
    return cfg


ARGV = ["train", "--preset", "cpu-demo"]


def test_a_tight_cpu_run_starts_again_with_tbbmalloc(clean_env, monkeypatch):
    _ram(monkeypatch, 8)  # 6.17 GiB x 1.7 is more than half of 8
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "-m", "core", *ARGV])  # as it was started
    allocator.prepare(_bench_cfg(), ARGV)
    assert os.environ[allocator.LEAN_MEMORY_ENV] == "1"
    [(exe, argv, env)] = clean_env
    assert exe == sys.executable and argv == [sys.executable, "-X", "utf8", "-m", "core", *ARGV]
    assert env["LD_PRELOAD"] == "/x/libtbbmalloc.so.2 /x/libtbbmalloc_proxy.so.2"
    assert env[allocator.ALLOCATOR_ENV] == "tbbmalloc" and env[allocator.LEAN_MEMORY_ENV] == "1"
    assert env["TBB_MALLOC_USE_HUGE_PAGES"] == "1" and env["TBB_MALLOC_SET_HUGE_OBJECT_THRESHOLD"] == str(1 << 20)
    assert vram.lean_swiglu_on("cpu") and not vram.lean_swiglu_on("cuda")  # a lean run's MLPs keep one tensor fewer


def test_a_run_with_room_keeps_the_defaults(clean_env, monkeypatch):
    _ram(monkeypatch, 24)
    allocator.prepare(_bench_cfg(), ARGV)
    assert clean_env == []
    assert os.environ[allocator.LEAN_MEMORY_ENV] == "0" and os.environ[allocator.ALLOCATOR_ENV] == "default"
    assert not vram.lean_swiglu_on("cpu")
    allocator.prepare(_bench_cfg(), ARGV)  # decided once: the process started again does not decide again
    assert clean_env == []


def test_a_run_that_may_use_a_gpu_is_left_to_the_child(clean_env, monkeypatch):
    """A GPU run is not lean; nor is it told "not lean": on a machine whose GPU torch cannot use, the child trains
    on the CPU after all and decides from its own estimate (glibc's settings)."""
    _ram(monkeypatch, 1)
    monkeypatch.setenv(allocator.LEAN_MEMORY_ENV, "1")
    allocator.prepare(_bench_cfg(device="cuda"), ARGV)
    assert clean_env == [] and os.environ[allocator.ALLOCATOR_ENV] == "default"
    assert os.environ[allocator.LEAN_MEMORY_ENV] == "1"  # the user's word stays as it was
    monkeypatch.delenv(allocator.LEAN_MEMORY_ENV)
    monkeypatch.delenv(allocator.ALLOCATOR_ENV)
    allocator.prepare(_bench_cfg(device="cuda"), ARGV)
    assert allocator.LEAN_MEMORY_ENV not in os.environ


@pytest.mark.parametrize("theirs", [{"LD_PRELOAD": "/opt/libjemalloc.so"}, {"MALLOC_ARENA_MAX": "4"}])
def test_the_users_own_allocator_settings_stand(clean_env, monkeypatch, theirs):
    for k, v in theirs.items():
        monkeypatch.setenv(k, v)
    _ram(monkeypatch, 8)
    allocator.prepare(_bench_cfg(), ARGV)
    assert clean_env == []  # no tbbmalloc over theirs; glibc's own knobs are then theirs too (child.hand_back...)
    assert os.environ[allocator.LEAN_MEMORY_ENV] == "1" and os.environ[allocator.ALLOCATOR_ENV] == "default"


def test_without_tbbmalloc_the_run_is_lean_with_glibc(clean_env, monkeypatch):
    monkeypatch.setattr(allocator, "tbbmalloc_libs", lambda: None)  # macOS, Windows, aarch64: no wheel
    monkeypatch.setenv(allocator.LEAN_MEMORY_ENV, "1")  # the user asks for it, whatever the RAM
    allocator.prepare(_bench_cfg(), ARGV)
    assert clean_env == [] and os.environ[allocator.ALLOCATOR_ENV] == "default"


def test_a_caller_inside_another_program_decides_nothing(clean_env, monkeypatch):
    _ram(monkeypatch, 8)
    allocator.prepare(_bench_cfg(), None)  # not the CLI's own process (a test calling core in-process)
    assert clean_env == [] and allocator.LEAN_MEMORY_ENV not in os.environ


def test_no_early_estimate_for_a_gguf_or_hub_model_leaves_it_to_the_child(clean_env, monkeypatch, tmp_path):
    _ram(monkeypatch, 1)
    cfg = _bench_cfg()
    cfg.model.source = str(tmp_path / "model.gguf")
    assert allocator.early_estimate(cfg) is None
    allocator.prepare(cfg, ARGV)
    assert clean_env == [] and allocator.LEAN_MEMORY_ENV not in os.environ


def test_the_early_estimate_counts_every_cpu_process_and_survives_a_damaged_config(tmp_path, capsys):
    one = allocator.early_estimate(_bench_cfg())
    two = _bench_cfg()
    two.train.devices = "2"  # two CPU processes over gloo: each holds a model and its step
    assert allocator.early_estimate(two) == 2 * one
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    cfg = _bench_cfg()
    cfg.model.source = str(broken)
    assert allocator.early_estimate(cfg) is None  # the run itself reports the damaged file, with its status
    assert "no early estimate" in capsys.readouterr().out


def test_the_proxy_is_seen_in_a_process_that_preloads_it():
    libs = allocator.tbbmalloc_libs()
    if libs is None:
        pytest.skip("no tbbmalloc here (the tbb wheel is for Linux x86-64)")
    code = "from core.train import allocator; print(allocator.active())"
    env = dict(os.environ, LD_PRELOAD=" ".join(map(str, libs)))
    with_it = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    without = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    assert (with_it.stdout.strip(), without.stdout.strip()) == ("tbbmalloc", "None"), with_it.stderr


@pytest.mark.integration
def test_a_lean_run_from_the_app_trains_with_tbbmalloc(tmp_path, tiny_model_dir):
    """The runner's child starts itself again with tbbmalloc, the lock still held (the run completes as the one
    training run), and train.log says what it did."""
    if allocator.tbbmalloc_libs() is None:
        pytest.skip("no tbbmalloc here (the tbb wheel is for Linux x86-64)")
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"), max_steps=2)
    cfg.train.device = "cpu"
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True, exist_ok=True)
    if any(k.startswith("MALLOC_") for k in os.environ):
        pytest.skip("a MALLOC_ variable is set here, and a user's allocator settings stand (no tbbmalloc)")
    run = Launch(home, cfg, {allocator.LEAN_MEMORY_ENV: "1", "LD_PRELOAD": ""})  # "": nothing of the user's
    st = run.wait(300)
    log = (run.run_dir / "train.log").read_text()
    assert st["state"] == "completed", log[-3000:]  # as the one training run: the lock went through the exec
    assert "starting the training process again with tbbmalloc" in log
    assert "the training process runs with tbbmalloc" in log
    assert "SwiGLU MLPs keep one activation fewer" in log and "mlp: " in log
