"""The tokenised-dataset cache (core/data/cache.py): the same data, tokenizer, template and settings hit it; a
change of any of them misses (one test each); a damaged cache file is rebuilt and replaced, never trusted."""

import pytest

from core.data import cache
from tests.helpers.data import config, jsonl
from tests.helpers.tiny import CHATML, tiny_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"What is two plus {i}?"},
                      {"role": "assistant", "content": f"The answer is {i + 2}."}]} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def data_file(tmp_path):
    return jsonl(tmp_path / "rows.jsonl", ROWS)


def _rows(prepared):
    return [(list(r["input_ids"]), list(r["labels"])) for r in prepared.train]


def _warm(cfg, tok):
    first, hit = cache.prepare(cfg, tok)
    assert not hit
    again, hit = cache.prepare(cfg, tok)
    assert hit and _rows(again) == _rows(first) and again.stats.to_dict() == first.stats.to_dict()
    return first


def test_same_inputs_hit_and_give_the_same_rows(tok, data_file):
    _warm(config(data_file, max_len=64), tok)
    assert len(list(cache.cache_dir().glob("*.pkl"))) == 1


def test_changed_data_file_misses(tok, data_file, tmp_path):
    cfg = config(data_file, max_len=64)
    before = _warm(cfg, tok)
    jsonl(tmp_path / "rows.jsonl", ROWS[:-1] + [{"messages": [{"role": "user", "content": "Hi?"},
                                                                {"role": "assistant", "content": "Hello."}]}])
    after, hit = cache.prepare(cfg, tok)
    assert not hit and _rows(after) != _rows(before)


def test_changed_tokenizer_misses(tok, data_file):
    cfg = config(data_file, max_len=64)
    _warm(cfg, tok)
    other = tiny_tokenizer()
    other.add_tokens(["plus two"])
    _, hit = cache.prepare(cfg, other)
    assert not hit


def test_changed_template_misses(tok, data_file):
    cfg = config(data_file, max_len=64)
    _warm(cfg, tok)
    other = CHATML.replace("{{ message['role'] }}\n", "{{ message['role'] }}: ")
    assert other != CHATML
    changed, hit = cache.prepare(cfg, tiny_tokenizer(other))
    assert not hit and len(changed.train)


def test_changed_max_len_misses(tok, data_file):
    _warm(config(data_file, max_len=64), tok)
    _, hit = cache.prepare(config(data_file, max_len=32), tok)
    assert not hit


@pytest.mark.parametrize("setting,value", [("train_on", "all"), ("system", "Be brief."), ("val_fraction", 0.25),
                                           ("packing", True), ("limit", 5), ("overlong", "drop")])
def test_changed_data_setting_misses(tok, data_file, setting, value):
    _warm(config(data_file, max_len=64), tok)
    _, hit = cache.prepare(config(data_file, max_len=64, **{setting: value}), tok)
    assert not hit


def test_changed_seed_misses_when_it_picks_the_held_out_rows(tok, data_file):
    cfg = config(data_file, max_len=64, val_fraction=0.25)
    _warm(cfg, tok)
    cfg.train.seed += 1
    _, hit = cache.prepare(cfg, tok)
    assert not hit


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_cache_file_is_rebuilt_not_trusted(tok, data_file, capsys, damage):
    cfg = config(data_file, max_len=64)
    good = _warm(cfg, tok)
    path = next(cache.cache_dir().glob("*.pkl"))
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-20] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray(b"not a cache file at all")
    path.write_bytes(bytes(blob))
    capsys.readouterr()
    rebuilt, hit = cache.prepare(cfg, tok)
    assert not hit and _rows(rebuilt) == _rows(good)
    assert "damaged" in capsys.readouterr().err
    _, hit = cache.prepare(cfg, tok)  # replaced by a good file
    assert hit


def test_hub_dataset_is_not_cached(tok):
    cfg = config("someone/some-dataset", max_len=64)
    assert cache.key(cfg, tok) is None
