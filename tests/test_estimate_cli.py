"""`python -m core estimate` as a user without a GPU sees it: what it estimated for, how to get a verdict, and
which method the answer is for."""

import re

import pytest

from core import hardware
from core.__main__ import main

GiB = 1024 ** 3


@pytest.fixture
def no_gpu(monkeypatch):
    # the same answer on any machine, with or without a GPU: this is the machine the test is about
    reading = hardware.HardwareReading(gpus=[], nvml_error="no NVIDIA GPU found", ram_total=16 * GiB,
                                       ram_available=12 * GiB, cpu_count=4)
    monkeypatch.setattr(hardware, "read", lambda: reading)


def _estimate(capsys, *argv) -> str:
    assert main(["estimate", *argv]) == 0
    return capsys.readouterr().out


def _row(text: str, name: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(name))
    return re.split(r"\s{2,}", line[12:].strip())


def _header(text: str) -> list[str]:
    return next(ln for ln in text.splitlines() if ln.strip().startswith("full")).split()


def test_without_a_gpu_it_says_what_it_estimated_for_and_offers_both_ways_to_a_verdict(no_gpu, capsys):
    text = _estimate(capsys)
    assert "Estimated for: GPU memory on a CUDA card of unknown size (this machine: no NVIDIA GPU found)" in text
    assert ("To check: --gpu-gb 8 (or 6 12 16 24 48 80) for a card of that size, or --cpu for RAM when training "
            "on this CPU (12.0 GB available)") in text
    assert not any(ln.startswith("verdict") for ln in text.splitlines())   # no card, so no verdict row


def test_method_qlora_changes_the_answer_without_a_gpu(no_gpu, capsys):
    lora, qlora = _estimate(capsys), _estimate(capsys, "--method", "qlora")
    assert _header(lora) == ["full", "[LoRA]", "QLoRA"]     # the column the answer is for is marked
    assert _header(qlora) == ["full", "LoRA", "[QLoRA]"]
    totals = _row(qlora, "total")
    assert f"qlora: about {totals[2]} of GPU memory; no verdict without a card size." in qlora
    assert f"lora: about {_row(lora, 'total')[1]} of GPU memory" in lora
    assert totals[2] != totals[1]   # the two answers name different figures


def test_cpu_gets_a_ram_verdict_for_the_chosen_method(no_gpu, capsys):
    text = _estimate(capsys, "--cpu", "--method", "qlora")
    assert "CPU: 12.0 GB RAM available of 16.0 GB" in text and "fp32 on CPU" in text
    assert _row(text, "verdict") == ["fits", "fits", "fits"]
    assert "\nqlora: fits: " in text and "--gpu-gb" not in text and "no verdict" not in text


def test_cpu_flag_is_documented(capsys):
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    assert "--cpu" in capsys.readouterr().out
