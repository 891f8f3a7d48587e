import json
import subprocess
import sys


def test_doctor_runs_without_gpu_and_says_so():
    p = subprocess.run([sys.executable, "-m", "core", "doctor"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert "no NVIDIA GPU" in p.stdout
    assert "torch" in p.stdout and "bitsandbytes" in p.stdout and "home" in p.stdout


def test_doctor_json():
    p = subprocess.run([sys.executable, "-m", "core", "doctor", "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(p.stdout)
    assert report["torch"]["cuda"] is False
    assert report["hardware"]["gpus"] == []
    assert report["bitsandbytes"]["ok"] is True, report["bitsandbytes"]
