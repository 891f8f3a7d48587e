"""Out of memory in the middle of a run (train.oom_recovery, core/train/recovery.py): the injected out of memory
(LORA_GARAGE_FAULT oom@stepK) of a real training child on the tiny model becomes a smaller step that carries on
with the same effective batch, and the losses after it equal a run started with those settings from the same
checkpoint; the remedies run out in their order and end in the triage; two CPU ranks recover together.

The runs start together at module start (each in its own home) so their start-up overlaps on a small CPU. The
off switch is checked with the other injected faults in tests/test_training.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from core import events as ev
from core.config import RunConfig, apply_overrides, from_dict
from core.errors import ConfigError
from core.runs import folder as runs
from core.runs import runner
from core.train import recovery
from tests.helpers.training import RESUME_TOLERANCE, Launch, from_checkpoint, losses, tiny_config, write_dataset

REPO = Path(__file__).resolve().parent.parent


def load_yaml_text(text: str) -> RunConfig:
    return from_dict(yaml.safe_load(text))


# ---------------------------------------------------------------- the remedies (fast)

def _train(**kw):
    t = RunConfig().train
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_the_remedies_keep_the_effective_batch_and_come_in_order():
    r = recovery.next_remedy(_train(batch_size=4, grad_accum=2))
    assert (r.what, r.batch_size, r.grad_accum, r.grad_checkpointing) == (ev.REMEDY_MICRO_BATCH, 2, 4, False)
    assert r.change == "micro-batch 4 -> 2, gradient accumulation 2 -> 4 (same effective batch)"
    r = recovery.next_remedy(_train(batch_size=6, grad_accum=1))  # odd factors too: 6 = 2 x 3 -> 3 x 2
    assert (r.batch_size, r.grad_accum) == (3, 2)
    r = recovery.next_remedy(_train(batch_size=3, grad_accum=2))
    assert (r.batch_size, r.grad_accum) == (1, 6)
    r = recovery.next_remedy(_train(batch_size=1, grad_accum=8))
    assert (r.what, r.batch_size, r.grad_accum, r.grad_checkpointing) == (ev.REMEDY_CHECKPOINTING, 1, 8, True)
    assert recovery.next_remedy(_train(batch_size=1, grad_checkpointing=True)) is None
    assert recovery.next_remedy(_train(batch_size=4, oom_recovery="off")) is None
    # auto+shorten: after those, data.max_len halved, never below 32
    t = _train(batch_size=1, grad_checkpointing=True, oom_recovery="auto+shorten")
    r = recovery.next_remedy(t, 100)
    assert (r.what, r.max_len, r.batch_size, r.grad_checkpointing) == (ev.REMEDY_SHORTEN, 50, 1, True)
    assert r.change == "data.max_len 100 -> 50 tokens"
    assert recovery.next_remedy(t, 40).max_len == 32 and recovery.next_remedy(t, 32) is None
    assert recovery.next_remedy(_train(batch_size=2, oom_recovery="auto+shorten"), 100).what == ev.REMEDY_MICRO_BATCH
    assert recovery.next_remedy(_train(batch_size=1, grad_checkpointing=True), 100) is None  # plain auto: no cut
    assert "auto+shorten would also halve data.max_len" in recovery.nothing_left(_train(), 100)
    assert "no lower than 32" in recovery.nothing_left(t, 32)


def test_the_probe_is_on_for_a_gpu_and_off_for_the_cpu_unless_asked():
    cfg = RunConfig()
    assert recovery.probe_wanted(cfg, "cuda") and not recovery.probe_wanted(cfg, "cpu")
    cfg.train.probe = "on"
    assert recovery.probe_wanted(cfg, "cpu")
    cfg.train.probe, cfg.train.objective = "auto", "dpo"  # SFT only: the preference collators differ
    assert not recovery.probe_wanted(cfg, "cuda")


def test_oom_recovery_is_a_validated_setting_with_help():
    from core.config import field_help

    assert "micro-batch" in field_help("train.oom_recovery")
    assert from_dict({"train": {"oom_recovery": "off"}}).validate().train.oom_recovery == "off"
    # YAML reads a bare off / on as false / true: `--set train.oom_recovery=off` and `probe: on` still mean them
    assert apply_overrides(RunConfig(), ["train.oom_recovery=off"]).validate().train.oom_recovery == "off"
    assert apply_overrides(RunConfig(), ["train.probe=on"]).validate().train.probe == "on"
    assert load_yaml_text("train:\n  probe: off\n  oom_recovery: auto\n").train.probe == "off"
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"oom_recovery": "sometimes"}}).validate()
    assert e.value.field == "train.oom_recovery"
    assert "halves data.max_len" in field_help("train.oom_recovery")
    assert apply_overrides(RunConfig(), ["train.oom_recovery=auto+shorten"]).validate().train.oom_recovery == "auto+shorten"
    cfg = RunConfig()  # cutting rows is for SFT data only: other objectives are told so
    cfg.train.oom_recovery, cfg.train.objective, cfg.data.source = "auto+shorten", "dpo", "builtin:demo-preference"
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.field == "train.oom_recovery" and "SFT data only" in str(e.value) and "this run trains dpo" in str(e.value)
    assert "oom_recovery=auto" in e.value.hint


def test_the_long_batch_fault_reads_a_token_count():
    from core.train.callbacks import parse_faults

    assert parse_faults("oomlong@tokens40,oom@step3") == {"oomlong": 40, "oom": 3}
    assert parse_faults("oomeval@rows0,oomsave@step0") == {"oomeval": 0, "oomsave": 0}
    with pytest.raises(ValueError, match="cannot parse"):
        parse_faults("oomlong@step3")


# ---------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def oom_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("oom")
    data = write_dataset(root / "identity.jsonl")
    data32 = write_dataset(root / "identity32.jsonl", n=32)
    long_data = write_long_dataset(root / "long.jsonl")

    def cfg(**train):
        return tiny_config(tiny_model_dir, data, **train)

    def eval_cfg(**train):  # 4 held-out rows, evaluated once at the end in batches of 2
        c = cfg(max_steps=2, **train)
        c.data.val_fraction = 0.25
        return c

    def long_cfg(max_len, **train):
        c = tiny_config(tiny_model_dir, long_data, max_steps=3, **train)
        c.data.max_len = max_len
        return c

    two = tiny_config(tiny_model_dir, data32, max_steps=6, grad_accum=4, save_steps=2)
    two.lora.dropout, two.train.devices = 0.0, "2"
    specs = {
        # every checkpoint kept: the reference starts from the one recovery saved (checkpoint-3)
        "recover": (cfg(max_steps=6, save_total_limit=10), {"LORA_GARAGE_FAULT": "oom@step4"}),
        # out of memory at step 1: no optimizer step done, so the run starts again with the smaller settings;
        # "halved" is that run started that way from the beginning
        "first": (cfg(max_steps=3), {"LORA_GARAGE_FAULT": "oom@step1"}),
        "halved": (cfg(max_steps=3, batch_size=1, grad_accum=4), {}),
        # the pre-flight probe (on for this CPU run) runs out: the run starts with the smaller settings
        "probe": (cfg(max_steps=3, probe="on"), {"LORA_GARAGE_FAULT": "oomprobe@step0"}),
        # every try of step 3 runs out: micro-batch 2 -> 1, then checkpointing on, then the triage
        "ladder": (cfg(max_steps=6), {"LORA_GARAGE_FAULT": "oomall@step3"}),
        "two": (two, {"LORA_GARAGE_FAULT": "oom@step4", "LORA_GARAGE_FAULT_RANK": "1"}),
        # every batch of rows over 40 tokens runs out: micro-batch 2 -> 1, checkpointing, then data.max_len
        # 128 -> 64 -> 32; "short" is the run started with those settings
        "shorten": (long_cfg(128, oom_recovery="auto+shorten"), {"LORA_GARAGE_FAULT": "oomlong@tokens40"}),
        "short": (long_cfg(32, batch_size=1, grad_accum=4, grad_checkpointing=True), {}),
        # after the loop: the evaluation's batch of 2 runs out (then fits at 1), or every one does (skipped), and
        # the final save runs out once; with recovery off, the adapter is saved before the evaluation fails
        "evalhalf": (eval_cfg(), {"LORA_GARAGE_FAULT": "oomeval@rows1"}),
        "evalskip": (eval_cfg(), {"LORA_GARAGE_FAULT": "oomeval@rows0,oomsave@step0"}),
        "evaloff": (eval_cfg(oom_recovery="off"), {"LORA_GARAGE_FAULT": "oomeval@rows0"}),
    }
    launched = {name: Launch(root / f"home-{name}", c, env) for name, (c, env) in specs.items()}
    yield {"runs": launched, "root": root, "model": tiny_model_dir, "data": data}
    for run in launched.values():
        with run.environ():
            if runs.read_status(run.run_dir)["state"] in runs.ACTIVE:
                runner.stop(run.run_id, grace_s=5)


def write_long_dataset(path: Path, n: int = 16) -> Path:
    """Rows of about 80 to 120 tokens on the tiny tokenizer: every one is cut at max_len 64."""
    rows = [{"messages": [{"role": "user", "content": "Who are you?"},
                          {"role": "assistant", "content": "My name is Garage. " * (12 + i % 8)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recovered(run_dir: Path) -> list[dict]:
    return ev.recoveries(ev.read(run_dir)[0])


@pytest.mark.integration
def test_an_out_of_memory_step_recovers_with_the_same_effective_batch_and_losses(oom_runs, capsys):
    run = oom_runs["runs"]["recover"]
    st = run.wait()
    log = (run.run_dir / "train.log").read_text()
    assert st["state"] == "completed", log[-3000:]
    got = losses(run.run_dir)
    assert list(got) == list(range(1, 7))  # every optimizer step once: the schedule did not move
    (r,) = _recovered(run.run_dir)
    assert (r[ev.AT_STEP], r[ev.STEP], r[ev.WHAT], r[ev.FROM_CHECKPOINT]) == (4, 3, ev.REMEDY_MICRO_BATCH, "checkpoint-3")
    assert (r[ev.BATCH_SIZE], r[ev.GRAD_ACCUM]) == (1, 4)  # effective batch 2 x 2 = 1 x 4
    assert r[ev.MESSAGE].startswith("recovered from out of memory at step 4: micro-batch 2 -> 1, gradient "
                                    "accumulation 2 -> 4 (same effective batch)")
    assert "injected by LORA_GARAGE_FAULT" in r[ev.WHY] and r[ev.MEM_BEFORE] > 0
    assert r[ev.MESSAGE] in log and st["recovered"] == r[ev.MESSAGE] and st["recoveries"] == 1
    saved = runs.load_config(run.run_dir).train  # the config records the settings the run finished with
    assert (saved.batch_size, saved.grad_accum, saved.grad_checkpointing) == (1, 4, False)
    assert (run.run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # the same checkpoint, resumed by a run configured with micro-batch 1 and grad_accum 4 from the start
    cfg = tiny_config(oom_runs["model"], oom_runs["data"], max_steps=6, save_total_limit=10, batch_size=1,
                      grad_accum=4)
    ref = from_checkpoint(oom_runs["root"] / "home-ref", cfg, run.run_dir, "checkpoint-3")
    assert ref.wait()["state"] == "completed", runs.tail_log(ref.run_dir, 40)
    want = losses(ref.run_dir)
    assert list(want) == [4, 5, 6]
    worst = max(abs(want[s] - got[s]) for s in (4, 5, 6))
    with capsys.disabled():
        print(f"\nOOM recovery equivalence: max |loss diff| over steps 4-6 = {worst:.3g} (tolerance {RESUME_TOLERANCE})")
    assert worst <= RESUME_TOLERANCE, (want, got)

    # the curve's marker and `runs show`
    from ui import plots

    frame = plots.loss_frame(ev.read(run.run_dir)[0])
    marks = frame[frame["series"] == "recovered at step 4"]
    assert list(marks["step"]) == [4, 4] and marks["value"].min() < marks["value"].max()
    out = subprocess.run([sys.executable, "-m", "core", "runs", "show", run.run_id], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "LORA_GARAGE_HOME": str(run.home)})
    assert out.returncode == 0, out.stderr
    assert "recovered: from out of memory at step 4: micro-batch 2 -> 1" in out.stdout


@pytest.mark.integration
def test_an_out_of_memory_at_the_first_step_restarts_with_the_smaller_settings(oom_runs, capsys):
    run, ref = oom_runs["runs"]["first"], oom_runs["runs"]["halved"]
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
    (r,) = _recovered(run.run_dir)
    assert r[ev.FROM_CHECKPOINT] is None and r[ev.STEP] == 0 and "restarts at step 1" in r[ev.MESSAGE]
    assert ref.wait()["state"] == "completed"
    _same_three_losses(run, ref, "OOM at step 1 vs a run started halved", capsys)


@pytest.mark.integration
def test_the_remedies_run_out_in_order_and_the_run_fails_with_the_triage(oom_runs):
    run = oom_runs["runs"]["ladder"]
    st = run.wait()
    assert st["state"] == "failed", runs.tail_log(run.run_dir, 40)
    # the retry's first step is step 3, so the phase reads "first step"
    assert st["error"]["kind"] == "oom" and st["error"]["message"] == "out of GPU memory during first step at step 3"
    assert "data.max_len" in st["error"]["hint"] or "quant.method=qlora" in st["error"]["hint"]
    steps = [(r[ev.WHAT], r[ev.BATCH_SIZE], r[ev.GRAD_ACCUM], r[ev.GRAD_CHECKPOINTING]) for r in _recovered(run.run_dir)]
    assert steps == [(ev.REMEDY_MICRO_BATCH, 1, 4, False), (ev.REMEDY_CHECKPOINTING, 1, 4, True)]
    log = (run.run_dir / "train.log").read_text()
    assert "no recovery: nothing left to change: micro-batch 1 and gradient checkpointing on" in log
    assert not (run.run_dir / "adapter").exists()


@pytest.mark.integration
def test_two_ranks_recover_together_when_one_runs_out(oom_runs):
    run = oom_runs["runs"]["two"]
    st = run.wait(600)
    log = (run.run_dir / "train.log").read_text()
    assert st["state"] == "completed", log[-4000:]
    (r,) = _recovered(run.run_dir)  # rank 0 writes the one event; it heard of rank 1's out of memory
    assert "another rank ran out of memory at step 4" in r[ev.WHY]
    assert (r[ev.BATCH_SIZE], r[ev.GRAD_ACCUM]) == (1, 8)
    change = "micro-batch 2 -> 1, gradient accumulation 4 -> 8 (same effective batch)"
    for rank in (0, 1):  # each rank took the same new settings and trained to the end
        said = [line for line in log.splitlines() if line.startswith(f"[default{rank}]:recovered from out of memory")]
        assert len(said) == 1 and change in said[0], said
    assert list(losses(run.run_dir)) == list(range(1, 7))


@pytest.mark.integration
def test_an_out_of_memory_in_the_probe_starts_the_run_smaller_and_records_the_peak(oom_runs):
    run, ref = oom_runs["runs"]["probe"], oom_runs["runs"]["halved"]
    st = run.wait()
    log = (run.run_dir / "train.log").read_text()
    assert st["state"] == "completed", log[-3000:]
    (r,) = _recovered(run.run_dir)
    assert r[ev.AT_STEP] == 0 and r[ev.FROM_CHECKPOINT] is None and (r[ev.BATCH_SIZE], r[ev.GRAD_ACCUM]) == (1, 4)
    assert r[ev.MESSAGE].startswith("recovered from out of memory in the pre-flight probe (before step 1): "
                                    "micro-batch 2 -> 1")
    probe = json.loads((run.run_dir / "estimate.json").read_text())["probe"]
    assert probe["peak_bytes"] > 0 and probe["batch_size"] == 1 and probe["longest_row_tokens"] > 0
    assert "pre-flight probe: forward + backward at the longest batch (1 x up to" in log
    # the probe leaves no trace in the numbers: the run equals one started with the smaller settings
    assert ref.wait()["state"] == "completed"
    got, want = losses(run.run_dir), losses(ref.run_dir)
    assert list(got) == list(want) == [1, 2, 3]
    assert max(abs(want[s] - got[s]) for s in want) <= RESUME_TOLERANCE, (want, got)


@pytest.mark.integration
def test_auto_shorten_halves_max_len_after_the_other_remedies_and_counts_the_rows_cut(oom_runs, capsys):
    run, ref = oom_runs["runs"]["shorten"], oom_runs["runs"]["short"]
    st = run.wait()
    log = (run.run_dir / "train.log").read_text()
    assert st["state"] == "completed", log[-3000:]
    got = [(r[ev.WHAT], r[ev.BATCH_SIZE], r[ev.GRAD_CHECKPOINTING], r[ev.MAX_LEN], r[ev.ROWS_CUT])
           for r in _recovered(run.run_dir)]
    assert got == [(ev.REMEDY_MICRO_BATCH, 1, False, 128, 0), (ev.REMEDY_CHECKPOINTING, 1, True, 128, 0),
                   (ev.REMEDY_SHORTEN, 1, True, 64, 16), (ev.REMEDY_SHORTEN, 1, True, 32, 16)]
    last = _recovered(run.run_dir)[-1]
    assert last[ev.MESSAGE].startswith("recovered from out of memory at step 1: data.max_len 64 -> 32 tokens, 16 of "
                                       "16 rows longer than that cut (data.overlong=truncate)")
    assert st["recovered"] == last[ev.MESSAGE] and st["recoveries"] == 4
    saved = runs.load_config(run.run_dir)  # the config and the fingerprint record the length it finished with
    assert (saved.data.max_len, saved.train.batch_size, saved.train.grad_checkpointing) == (32, 1, True)
    assert runs.read_fingerprint(run.run_dir)["data"]["max_len"] == 32
    out = subprocess.run([sys.executable, "-m", "core", "runs", "show", run.run_id], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "LORA_GARAGE_HOME": str(run.home)})
    assert out.returncode == 0, out.stderr
    assert "data.max_len 64 -> 32 tokens, 16 of 16 rows longer than that cut" in out.stdout
    # restarted at step 1 each time: the run equals one started at max_len 32, micro-batch 1, checkpointing on
    assert ref.wait()["state"] == "completed"
    _same_three_losses(run, ref, "auto+shorten vs a run started at max_len 32", capsys)


def _same_three_losses(run, ref, what: str, capsys) -> None:
    """The recovered run's losses at steps 1-3 equal those of the reference run started with the smaller settings."""
    want, have = losses(ref.run_dir), losses(run.run_dir)
    assert list(have) == list(want) == [1, 2, 3]
    worst = max(abs(want[s] - have[s]) for s in want)
    with capsys.disabled():
        print(f"\n{what}: max |loss diff| = {worst:.3g}")
    assert worst <= RESUME_TOLERANCE, (want, have)


def _warnings(run_dir: Path) -> list[str]:
    return [e[ev.MESSAGE] for e in ev.logs(ev.read(run_dir)[0]) if e[ev.LEVEL] == "warning"]


@pytest.mark.integration
def test_an_out_of_memory_in_the_final_evaluation_halves_its_batch(oom_runs):
    run = oom_runs["runs"]["evalhalf"]
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
    said = [w for w in _warnings(run.run_dir) if "end-of-run evaluation" in w]
    assert len(said) == 1 and "evaluation batch 2 -> 1, evaluating again" in said[0], said
    (e,) = ev.of_type(ev.read(run.run_dir)[0], ev.EVAL)  # the evaluation at 1 row a batch gave its loss
    assert e[ev.STEP] == 2 and e[ev.EVAL_LOSS] > 0


@pytest.mark.integration
def test_an_evaluation_that_never_fits_is_skipped_and_the_final_save_frees_the_optimizer(oom_runs):
    run = oom_runs["runs"]["evalskip"]
    st = run.wait()
    log = (run.run_dir / "train.log").read_text()
    assert st["state"] == "completed", log[-3000:]
    said = _warnings(run.run_dir)
    save = [w for w in said if w.startswith("out of memory in the final save")]
    assert len(save) == 1 and "freed the optimizer state (" in save[0] and "and saved again" in save[0], said
    assert float(save[0].split("optimizer state (")[1].split(" MB")[0]) > 0  # Adam's moments were there to free
    skip = [w for w in said if "the evaluation is skipped" in w]
    assert len(skip) == 1 and "at 1 row a batch" in skip[0], said
    assert not ev.of_type(ev.read(run.run_dir)[0], ev.EVAL)
    assert (run.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "final save: the adapter is saved" in log


@pytest.mark.integration
def test_the_adapter_is_saved_before_the_final_evaluation(oom_runs):
    run = oom_runs["runs"]["evaloff"]  # recovery off: the out of memory in the evaluation fails the run...
    st = run.wait()
    assert st["state"] == "failed", runs.tail_log(run.run_dir, 40)
    assert st["error"]["kind"] == "oom" and st["error"]["message"] == "out of GPU memory during final eval at step 2"
    assert (run.run_dir / "adapter" / "adapter_model.safetensors").is_file()  # ...and loses no work


def test_a_checkpoint_of_the_last_step_is_known_as_the_end(tmp_path):
    # transformers' resume from such a checkpoint would run a step past max_steps: the child saves it instead
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 6}))
    assert recovery.trained_to_the_end(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 6}))
    assert not recovery.trained_to_the_end(tmp_path)
