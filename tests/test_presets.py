import pytest

from core import config as C
from core import presets
from core.errors import ConfigError


def test_builtin_presets_exist():
    names = presets.list_presets()
    assert "cpu-demo" in names
    for tier in ("gpu-6gb-qlora", "gpu-8gb-qlora", "gpu-12gb-qlora", "gpu-16gb-lora", "gpu-16gb-qlora",
                 "gpu-24gb-lora", "gpu-24gb-qlora"):
        assert tier in names


@pytest.mark.parametrize("name", presets.list_presets())
def test_every_preset_loads_validates_and_has_a_header(name):
    cfg = presets.load(name)
    cfg.validate()
    head = presets.header(name)
    assert "python -m core train --preset" in head and "Trade-offs" in head


def test_cpu_demo_is_the_golden_path():
    cfg = presets.load("cpu-demo")
    assert cfg.model.source == "builtin:smollm2-135m"
    assert cfg.data.source == "builtin:demo-identity"
    assert cfg.quant.method == "lora"
    assert 30 <= cfg.train.max_steps <= 60


def test_apply_keeps_what_the_preset_does_not_set():
    base = C.apply_overrides(C.RunConfig(), ["model.source=/my/model", "data.source=/my/data.jsonl"])
    cfg = presets.apply("gpu-8gb-qlora", base)
    assert cfg.model.source == "/my/model" and cfg.data.source == "/my/data.jsonl"
    assert cfg.quant.method == "qlora" and cfg.train.grad_checkpointing


def test_user_preset_round_trip(garage_home):
    cfg = C.apply_overrides(presets.load("cpu-demo"), ["lora.r=4"])
    path = presets.save_user_preset("my-setup", cfg, "for my laptop")
    assert path.parent == garage_home / "presets"
    assert "my-setup" in presets.list_presets()
    assert presets.load("my-setup") == cfg
    assert presets.header("my-setup").splitlines()[0].startswith("my-setup: for my laptop")


@pytest.mark.parametrize("bad", ["", "../x", "cpu-demo", "a b"])
def test_user_preset_bad_names(bad):
    with pytest.raises(ConfigError):
        presets.save_user_preset(bad, C.RunConfig())
