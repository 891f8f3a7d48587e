"""Issue 15, one test per item: a full disk named as such, no lock race after Stop, uploads that never overwrite,
paths confined when the app is shared, bounds on absurd settings, a quiet foreground CLI, --auth, small fixes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.runs import access
from core.estimate import limits
from core.runs import procs
from core.runs import runner
from core.runs import folder as runs
from core.__main__ import main as cli
from core.config import RunConfig
from core.errors import BusyError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _run(state="running", pid=None, **fields) -> Path:
    cfg = RunConfig()
    cfg.model.source = "/models/tiny"
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, state=state, pid=pid, **fields)
    return run_dir


# ---------------------------------------------------------------- 1. a full disk, wrapped by safetensors

FULL_DISK = """
import json, os, sys
from pathlib import Path
import safetensors.torch, torch
from core.runs import folder as runs
from core.config import RunConfig
from core.train.callbacks import Context
from core.train.child import classify

cfg = RunConfig()
cfg.model.source = "/models/tiny"
run_dir = runs.create(cfg)
good = runs.checkpoints_dir(run_dir) / "checkpoint-2"
good.mkdir(parents=True)
(good / "adapter_model.safetensors").write_bytes(b"x" * (1 << 20))
(good / runs.COMPLETE).touch()
cut = runs.checkpoints_dir(run_dir) / "checkpoint-4"
cut.mkdir()
ctx = Context()
ctx.phase, ctx.step = "save", 4
try:  # 16 MB into a 4 MB filesystem: the real safetensors writer meets ENOSPC from the kernel
    safetensors.torch.save_file({"w": torch.zeros(4096, 1024)}, str(cut / "adapter_model.safetensors"))
except Exception as e:
    err = classify(e, ctx, cfg, run_dir)
    print(json.dumps({"raised": f"{type(e).__name__}: {e}", "error": err.to_dict(),
                      "checkpoints": sorted(p.name for p in runs.checkpoints_dir(run_dir).iterdir()),
                      "latest": runs.latest_checkpoint(run_dir).name}))
"""


@pytest.mark.integration
def test_a_disk_that_fills_during_a_checkpoint_save_is_named_and_the_partial_save_set_aside(tmp_path):
    """A 4 MB tmpfs as the app home (mounted in a private user + mount namespace, so no root is needed)."""
    fs = tmp_path / "small-fs"
    fs.mkdir()
    env = dict(os.environ, LORA_GARAGE_HOME=str(fs / "home"))
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
           'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"', str(fs), sys.executable, "-c", FULL_DISK]
    probe = subprocess.run(cmd[:7] + [str(fs), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs in a user namespace here: {probe.stderr.strip()}")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["raised"].startswith("SafetensorError") and "os error 28" in result["raised"]  # wrapped ENOSPC
    err = result["error"]
    assert err["kind"] == "disk"
    assert "disk filled up during save at step 4" in err["message"]
    assert "checkpoint-2 is intact" in err["message"] and "partial-checkpoint-4" in err["message"]
    assert "free at least 1 MB" in err["hint"] and "MB free now" in err["hint"]
    assert result["checkpoints"] == ["checkpoint-2", "partial-checkpoint-4"]  # set aside at once
    assert result["latest"] == "checkpoint-2"


# ---------------------------------------------------------------- 2. the lock right after a run ended

HOLDER = """
import os, sys, time
from core.runs import runner
lock = runner.acquire_lock(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()   # the test says when to "finish": the lock goes when this process exits
time.sleep(0.3)        # a process still tearing down after its final status was written
"""


def _holder(run_id: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_id], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_that_has_ended_is_not_busy_while_its_process_exits():
    run_dir = _run()
    proc = _holder(run_dir.name)
    try:
        with pytest.raises(BusyError, match=f"busy: run {run_dir.name} is training"):
            runner.acquire_lock("next")  # still running: busy at once
        runs.write_status(run_dir, state="stopped")  # the final state is written, the process not gone yet
        proc.stdin.write("done\n")
        proc.stdin.flush()
        runner.acquire_lock("next").close()  # waits for the exiting holder instead of saying busy
    finally:
        proc.stdin.close()
        proc.wait()


# ---------------------------------------------------------------- 3. uploads never overwrite

def test_an_upload_never_replaces_an_earlier_upload_of_the_same_name(tmp_path, garage_home):
    from ui.train_tab import keep_upload

    first, second = tmp_path / "a" / "data.jsonl", tmp_path / "b" / "data.jsonl"
    first.parent.mkdir()
    second.parent.mkdir()
    first.write_text('{"text": "old"}\n')
    second.write_text('{"text": "new"}\n')
    kept_first, kept_second = keep_upload(str(first)), keep_upload(str(second))
    assert kept_first != kept_second
    assert Path(kept_first).read_text() == '{"text": "old"}\n'  # the run trained on this one can still resume
    assert Path(kept_second).read_text() == '{"text": "new"}\n'
    assert Path(kept_first).parent.parent == garage_home / "uploads" and Path(kept_first).name == "data.jsonl"
    assert keep_upload(str(first)) == kept_first  # the same bytes again: the same file, no copy


# ---------------------------------------------------------------- 4. paths confined when the app is shared

def test_a_shared_app_reads_datasets_and_models_only_from_its_home_and_allowed_folders(tmp_path, garage_home,
                                                                                      monkeypatch):
    from ui import train_tab

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "ok.jsonl").write_text('{"text": "hello"}\n')
    (garage_home / "escape").symlink_to("/etc", target_is_directory=True)

    cfg = RunConfig()
    cfg.data.source = "/etc/hostname"
    access.check_config(cfg)  # the local single-user app: a path field is the feature

    monkeypatch.setenv(access.CONFINE_ENV, "0")
    monkeypatch.setenv(access.ALLOW_ENV, "")
    access.confine([str(shared)])
    for source in ("/etc/hostname", str(garage_home / "escape" / "hostname"), "../../../../etc/hostname"):
        cfg.data.source = source
        with pytest.raises(ConfigError, match="data.source: .* outside the folders this shared app may read") as e:
            runner.start(cfg)
        assert "--allow-dir" in e.value.hint
    assert list(runs.runs_dir().iterdir()) == []  # refused before anything was created
    cfg.data.source = "builtin:demo-identity"
    cfg.model.source = "/etc"
    with pytest.raises(ConfigError, match="model.source"):
        runner.start(cfg)
    for source in (str(shared / "ok.jsonl"), "builtin:demo-identity", "someone/some-dataset"):
        cfg = RunConfig()
        cfg.data.source = source
        access.check_config(cfg)

    # through the page's handlers: the preview and the model card name the refusal, and show nothing of /etc
    cfg = RunConfig()
    cfg.data.source = "/etc/passwd"
    form = _form(cfg)
    r = train_tab.inspect_page(*form)
    md, preview = r.summary, r.preview
    assert "outside the folders this shared app may read" in md and "root:" not in md + preview
    assert "outside the folders" in train_tab.model_info_md("/etc")


def _form(cfg):
    from ui import train_form

    names = [f"{section}.{name}" for section, values in cfg.to_dict().items() for name in values]
    return names, train_form.values_of(names, cfg)


# ---------------------------------------------------------------- 5. bounds on settings nobody can mean

def test_settings_beyond_the_model_or_the_data_are_refused_before_a_run_exists(tmp_path, capsys):
    data = tmp_path / "three.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    cases = [(["lora.r=100000"], "lora.r: rank 100000 is above this model's layer width (576)"),
             (["data.max_len=100000"], "data.max_len: 100000 tokens is above this model's context of 8192"),
             (["train.batch_size=100000"], "train.batch_size: 100000 is more than the 3 rows")]
    for overrides, message in cases:
        cfg = RunConfig()
        cfg.data.source = str(data)
        from core.config import apply_overrides

        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            limits.check(apply_overrides(cfg, overrides))
    # the CLI: exit 2, the message, no run folder left behind
    assert cli(["train", "--dataset", str(data), "--set", "lora.r=100000"]) == 2
    assert "error: lora.r: rank 100000" in capsys.readouterr().err
    assert list(runs.runs_dir().iterdir()) == []


def test_on_a_cpu_the_estimate_is_held_against_the_ram():
    from types import SimpleNamespace

    from core.estimate import vram
    from core.config import apply_overrides
    from ui import vram_panel

    shape = vram.shape_from_config(json.loads((ROOT / "core/builtin_models/smollm2-135m-config.json").read_text()))
    ram = SimpleNamespace(ram_total=24 * 2**30, ram_available=20 * 2**30)
    huge = apply_overrides(RunConfig(), ["train.batch_size=100000"])
    assert vram_panel.cpu_verdict_text(huge, shape, "lora", ram).startswith("**does not fit** in RAM")
    assert vram_panel.cpu_verdict_text(RunConfig(), shape, "lora", ram).startswith("**fits** in RAM")


# ---------------------------------------------------------------- 6. the foreground CLI: user errors, no traceback

def _cli(*args, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LORA_GARAGE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "core", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.integration
def test_foreground_train_reports_user_errors_without_a_traceback(tmp_path, garage_home, tiny_model_dir):
    out = _cli("--model", "/nonexistent", home=garage_home)
    assert out.returncode == 2, out.stderr
    assert "error: model folder not found: /nonexistent" in out.stderr and "fix:" in out.stderr
    assert "Traceback" not in out.stderr
    assert list(runs.runs_dir().iterdir()) == []  # checked before the run folder is made

    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"}, {"text": ')
    out = _cli("--model", str(tiny_model_dir), "--dataset", str(bad), "--max-steps", "1", home=garage_home)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "error: " in out.stderr and "bad.json" in out.stderr and "fix:" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert list(runs.runs_dir().iterdir()) == []  # runner.admit reads the first rows: refused before a run folder


# ---------------------------------------------------------------- 7. --auth

def test_auth_is_refused_when_nobody_could_log_in_and_can_come_from_env_or_file(tmp_path, capsys):
    import app

    for value in ("user", ":", "user:", ":secret"):
        assert app.main(["--host", "0.0.0.0", "--auth", value]) == 2, value
        err = capsys.readouterr().err
        assert err.startswith("error: --auth: ") and "fix:" in err and "Traceback" not in err
    assert access.parse_auth("ann", environ={access.PASSWORD_ENV: "s3cret"}) == ("ann", "s3cret")
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    assert access.parse_auth("ann", str(secret), environ={}) == ("ann", "from-a-file")
    assert access.parse_auth("ann:a:b", environ={}) == ("ann", "a:b")
    assert access.parse_auth(None, environ={access.PASSWORD_ENV: "x"}) is None
    with pytest.raises(ConfigError, match="--auth-file: cannot read"):
        access.parse_auth("ann", str(tmp_path / "missing"), environ={})


# ---------------------------------------------------------------- 8. small items

def test_run_name_length_cli_crash_message_end_time_and_first_start(tmp_path):
    cfg = RunConfig()
    cfg.output.run_name = "a" * 300
    with pytest.raises(ConfigError, match="is 300 characters long; the limit is 100"):
        cfg.validate()

    # a run started in a terminal dies unseen: it is not called an app session, and its end is its last output
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = _run(pid=dead.pid, launched_by=procs.LAUNCHED_BY_CLI)
    (run_dir / "train.log").write_text("step 3\n")
    (run_dir / "events.jsonl").write_text("")
    for name in ("train.log", "events.jsonl"):
        os.utime(run_dir / name, (1_700_000_000, 1_700_000_000))
    st = runs.read_status(run_dir)
    assert st["state"] == "failed"
    assert "started in a terminal by python -m core train" in st["error"]["message"]
    assert "earlier app session" not in st["error"]["message"]
    assert st["ended_at"].startswith("2023-11-1") and st["noticed_at"] != st["ended_at"]
    assert "noticed at" in st["error"]["message"]

    # a resume keeps the first start
    runs.write_status(run_dir, started_at="2026-01-01T10:00:00+00:00")
    runs.write_status(run_dir, started_at="2026-01-02T09:00:00+00:00")
    st = runs.read_status(run_dir, reconcile=False)
    assert st["started_at"] == "2026-01-01T10:00:00+00:00" and st["resumed_at"] == "2026-01-02T09:00:00+00:00"


def test_two_threads_writing_the_same_file_atomically_both_succeed(tmp_path):
    """The app's handlers run in threads: two Inspect clicks on the same data stored the same file at once, and with
    one temporary name per process the second rename found nothing (a FileNotFoundError under bench/app_load.py)."""
    import threading

    from core.runs import folder as runs

    target, errors = tmp_path / "same.json", []
    barrier = threading.Barrier(8)

    def write(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(50):
                runs.write_atomic(target, f'{{"writer": {k}}}' + " " * 20000, durable=False)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text().startswith('{"writer": ') and not list(tmp_path.glob(".same.json.tmp-*"))
