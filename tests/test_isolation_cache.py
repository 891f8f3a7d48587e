"""The padding-free check's stored verdict (core.train.isolation_cache): read back at the next start instead of
running the check again; a change of anything it depends on misses; a damaged file is checked again and replaced;
a check that raised is not stored."""

import json

import pytest
import torch

from core.config import RunConfig
from core.train import collate, isolation_cache


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")


def _no_check(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the check ran although its verdict is stored")

    monkeypatch.setattr(collate, "isolation_check", refuse)


def test_the_verdict_is_read_back_at_the_next_start(model, monkeypatch):
    cfg = RunConfig()
    ok, detail, cached = isolation_cache.checked(model, cfg, "cpu")
    assert ok and not cached and "flattened vs alone" in detail
    assert len(list(isolation_cache.cache_dir().glob("*.json"))) == 1
    _no_check(monkeypatch)
    ok2, detail2, cached2 = isolation_cache.checked(model, cfg, "cpu")
    assert ok2 and cached2 and detail2.startswith(detail) and "read back" in detail2


def test_what_decides_the_verdict_is_in_the_key(model, monkeypatch):
    cfg = RunConfig()
    base = isolation_cache.key(model, cfg, "cpu")
    assert isolation_cache.key(model, cfg, "cpu") == base
    other = RunConfig()
    other.quant.method = "qlora"
    assert isolation_cache.key(model, other, "cpu") != base
    model.config._attn_implementation = "eager"
    try:
        assert isolation_cache.key(model, cfg, "cpu") != base
    finally:
        model.config._attn_implementation = "sdpa"
    eps = model.config.rms_norm_eps
    model.config.rms_norm_eps = eps * 2  # another configuration of the same class
    try:
        assert isolation_cache.key(model, cfg, "cpu") != base
    finally:
        model.config.rms_norm_eps = eps
    real = isolation_cache._version
    monkeypatch.setattr(isolation_cache, "_version", lambda n: "99.0" if n == "transformers" else real(n))
    assert isolation_cache.key(model, cfg, "cpu") != base
    monkeypatch.setattr(isolation_cache, "_version", real)
    model.to(torch.bfloat16)
    try:
        assert isolation_cache.key(model, cfg, "cpu") != base
    finally:
        model.to(torch.float32)
    assert isolation_cache.key(model, cfg, "cpu") == base


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"key": "another", "ok": True, "detail": "x",
                                                               "checked_at": "now"}),
                                    "<key>"])
def test_a_damaged_file_is_checked_again_and_replaced(model, damage, capsys):
    cfg = RunConfig()
    k = isolation_cache.key(model, cfg, "cpu")
    path = isolation_cache.cache_dir() / f"{k}.json"
    if damage == "<key>":  # the right key, a field of the wrong kind
        damage = json.dumps({"key": k, "ok": "yes", "detail": "x", "checked_at": "now"})
    path.write_text(damage)
    ok, detail, cached = isolation_cache.checked(model, cfg, "cpu")
    assert ok and not cached
    assert "padding-free cache file" in capsys.readouterr().err
    assert json.loads(path.read_text())["ok"] is True


def test_a_check_that_raised_is_not_stored(model, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(collate, "isolation_check", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        isolation_cache.checked(model, RunConfig(), "cpu")
    assert not list(isolation_cache.cache_dir().glob("*.json"))
