import pytest

from core import config as C
from core.errors import ConfigError


@pytest.mark.parametrize("override, field", [
    ("lora.r=0", "lora.r"),
    ("lora.r=-3", "lora.r"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("lora.targets=,", "lora.targets"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-4", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("quant.method=gptq", "quant.method"),
    ("quant.quant_type=int3", "quant.quant_type"),
    ("data.max_len=4", "data.max_len"),
    ("data.val_fraction=0.95", "data.val_fraction"),
    ("data.overlong=wrap", "data.overlong"),
    ("model.source=", "model.source"),
    ("output.run_name=../../etc", "output.run_name"),
])
def test_each_bad_field_is_named(override, field):
    with pytest.raises(ConfigError) as e:
        C.apply_overrides(C.RunConfig(), [override]).validate()
    assert e.value.field == field
    assert field in str(e.value) and e.value.hint


@pytest.mark.parametrize("override, field", [
    ("lora.r=abc", "lora.r"), ("train.lr=fast", "train.lr"), ("train.grad_checkpointing=maybe", "train.grad_checkpointing"),
    ("lora.rank=8", "lora.rank"), ("nosuch.x=1", "nosuch"),
])
def test_bad_types_and_unknown_keys_are_named(override, field):
    with pytest.raises(ConfigError) as e:
        C.apply_overrides(C.RunConfig(), [override])
    assert e.value.field == field


def test_4bit_without_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setattr(C, "bnb_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        C.apply_overrides(C.RunConfig(), ["quant.method=qlora"]).validate()
    assert e.value.field == "quant.method" and "bitsandbytes" in e.value.message


def test_overrides_parse_types():
    cfg = C.apply_overrides(C.RunConfig(), ["lora.r=32", "train.lr=1e-4", "train.grad_checkpointing=true",
                                            "lora.targets=q_proj,v_proj", "train.sample_prompts=[hi, there]"])
    assert cfg.lora.r == 32 and isinstance(cfg.lora.r, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.grad_checkpointing is True
    assert C.target_modules(cfg.lora.targets) == ["q_proj", "v_proj"]
    assert cfg.train.sample_prompts == ["hi", "there"]
    cfg.validate()


def test_yaml_round_trip(tmp_path):
    cfg = C.apply_overrides(C.RunConfig(), ["lora.r=8", "quant.method=qlora", "data.columns={prompt: q}"])
    C.save_yaml(cfg, tmp_path / "c.yaml", header="# hello")
    again = C.load_yaml(tmp_path / "c.yaml")
    assert again == cfg
    assert (tmp_path / "c.yaml").read_text().startswith("# hello")


def test_bad_yaml_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("lora: [unclosed")
    with pytest.raises(ConfigError):
        C.load_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError):
        C.load_yaml(tmp_path / "missing.yaml")


def test_every_field_has_help():
    for section in ("model", "data", "lora", "quant", "train", "output"):
        for f in C.fields(getattr(C.RunConfig(), section)):
            assert C.field_help(f"{section}.{f.name}")


def test_target_presets():
    assert C.target_modules("all-linear") == "all-linear"
    assert C.target_modules("attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
