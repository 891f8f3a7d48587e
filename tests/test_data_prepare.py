"""prepare(): chat templates, the loss mask, length handling, packing, splits, stats, previews and the CLI."""

import json
from pathlib import Path

import pytest

from core.data.sft import load_rows, prepare, preview_html, preview_text
from core.errors import DatasetError
from tests.helpers.data import config, jsonl

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! My name is Garage."}, {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four.\nThe sky is blue."}]
NO_SYSTEM = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Garage."}]
# SmolLM2's shape: a default system prompt is injected when the conversation has none.
INJECTING = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
             "{{ '<|im_start|>system\nYou are a helpful assistant named SmolLM<|im_end|>\n' }}{% endif %}"
             "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A reasoning-model shape: the last assistant turn renders differently from earlier ones, so prefixes of the
# conversation are not prefixes of the whole; the mask falls back to finding the texts in order.
LAST_DIFFERS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
                "(final)\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SYSTEM_ALLOWED = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                     "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def tokenizer_for(model_dir: Path, template: str | None = "keep"):
    from core.models import load_tokenizer

    tok = load_tokenizer(Path(model_dir))
    if template != "keep":
        tok.chat_template = template
    return tok


def trained_runs(tok, row: dict) -> list[str]:
    """The decoded text of each run of consecutive loss-carrying tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.fixture(scope="module")
def chatml(tiny_model_dir):
    return tokenizer_for(tiny_model_dir)


# ---------------------------------------------------------------- the loss mask

@pytest.mark.parametrize("model, template, end, last", [
    ("tiny_model_dir", "keep", "<|im_end|>", ""),                  # ChatML
    ("tiny_model_dir_llama3", "keep", "<|eot_id|>", ""),           # Llama 3 (bos, headers, trimmed content)
    ("tiny_model_dir", INJECTING, "<|im_end|>", ""),               # injects a default system prompt
    # Earlier turns are found by text; the final turn's "(final)" is what the model must generate after the
    # generation prompt, so it is trained (as "<think></think>" would be for a reasoning template).
    ("tiny_model_dir", LAST_DIFFERS, "<|im_end|>", "(final)\n"),
    ("tiny_model_dir_llama3", None, "<|im_end|><|eot_id|>", ""),   # no template: our ChatML + the model's EOS
])
def test_loss_mask_is_exactly_the_assistant_turns(request, tmp_path, model, template, end, last):
    tok = tokenizer_for(request.getfixturevalue(model), template)
    prepared = prepare(config(jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": NO_SYSTEM}])), tok)
    first, second = prepared.train
    assert trained_runs(tok, first) == [f"Hello! My name is Garage.{end}", f"{last}Four.\nThe sky is blue.{end}"]
    assert trained_runs(tok, second) == [f"{last}I am Garage.{end}"]
    assert prepared.stats.template_is_default is (template is None)
    if template is None:
        assert tok.decode(first["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    else:  # the tokens are exactly the model's own template, rendered
        rendered = tok.apply_chat_template(CHAT, tokenize=False)
        assert tok.decode(first["input_ids"], skip_special_tokens=False) == rendered


def test_preview_marks_exactly_the_trained_text(tmp_path, chatml):
    prepared = prepare(config(jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])), chatml)
    runs = prepared.samples[0]
    assert [t for t, trained in runs if trained] == ["Hello! My name is Garage.<|im_end|>",
                                                     "Four.\nThe sky is blue.<|im_end|>"]
    assert "".join(t for t, _ in runs) == chatml.apply_chat_template(CHAT, tokenize=False)
    text = preview_text(prepared)
    assert "⟦Hello! My name is Garage.<|im_end|>⟧" in text and "⟦Be brief" not in text


def test_train_on_all_trains_every_token(tmp_path, chatml):
    prepared = prepare(config(jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), train_on="all"), chatml)
    row = prepared.train[0]
    assert row["labels"] == row["input_ids"]
    assert prepared.stats.trained_tokens == prepared.stats.total_tokens == len(row["input_ids"])


def test_template_that_rejects_a_row_names_it(tmp_path, tiny_model_dir):
    tok = tokenizer_for(tiny_model_dir, NO_SYSTEM_ALLOWED)
    path = jsonl(tmp_path / "d.jsonl", [{"messages": NO_SYSTEM}, {"messages": CHAT}])
    with pytest.raises(DatasetError) as e:
        prepare(config(path), tok)
    assert e.value.line == 2 and "System role not supported" in e.value.message


def test_tokens_straddling_a_span_start_are_trained():
    from core.data.tokenize import OffsetEncoding, loss_mask

    #                          "ab" "c Fo" "ur" "\n"   span = "Four", starting inside the second token
    enc = OffsetEncoding([1, 2, 3, 4], [(0, 2), (2, 6), (6, 8), (8, 9)])
    assert list(loss_mask(enc, [(4, 8)], 4)) == [0, 1, 1, 0]
    assert list(loss_mask(enc, [(0, 2), (6, 8)], 4)) == [1, 0, 1, 0]
    assert list(loss_mask(enc, [], 4)) == [0, 0, 0, 0]
    gap = OffsetEncoding([1, 2, 3], [(0, 2), (3, 5), (6, 8)])  # characters 2 and 5 are in no token
    assert list(loss_mask(gap, [(2, 6)], 3)) == [0, 1, 0]


# ---------------------------------------------------------------- lengths, packing, splits

def _rows(n: int, words: int = 3) -> list[dict]:
    return [{"prompt": f"Question {i}?", "completion": " ".join(["blue sky"] * (words + i))} for i in range(n)]


def test_overlong_rows_are_cut_or_dropped_and_counted(tmp_path, chatml):
    path = jsonl(tmp_path / "d.jsonl", _rows(10, words=2))
    full = prepare(config(path, max_len=512), chatml)
    lengths = full.stats.lengths
    cutoff = sorted(lengths)[5]
    over = sum(1 for n in lengths if n > cutoff)
    cut = prepare(config(path, max_len=cutoff), chatml)
    assert cut.stats.lengths == lengths and cut.stats.truncated == over and cut.stats.dropped == 0
    assert all(len(r["input_ids"]) <= cutoff for r in cut.train) and len(cut.train) == 10
    assert cut.stats.tokens()["over_max_len"] == over and cut.stats.tokens()["share_truncated"] == over / 10
    dropped = prepare(config(path, max_len=cutoff, overlong="drop"), chatml)
    assert dropped.stats.dropped == over and len(dropped.train) == 10 - over
    assert any("dropped" in w for w in dropped.stats.warnings)


def test_nothing_left_to_train_on_is_an_error(tmp_path, chatml):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "blue sky " * 30, "completion": "Four."}] * 3)
    with pytest.raises(DatasetError, match="every row is longer than max_len=16") as e:
        prepare(config(path, max_len=16, overlong="drop"), chatml)
    assert "data.max_len" in e.value.hint
    with pytest.raises(DatasetError, match="no row has any assistant tokens"):  # the cut leaves only the prompt
        prepare(config(path, max_len=16), chatml)


def test_packing_fills_max_len_and_restarts_positions(tmp_path, chatml):
    path = jsonl(tmp_path / "d.jsonl", _rows(12))
    plain = prepare(config(path, max_len=128), chatml)
    packed = prepare(config(path, max_len=128, packing=True), chatml)
    assert packed.stats.packing and len(packed.train) < len(plain.train) == 12
    assert packed.stats.train_rows == len(packed.train)
    assert sum((r["input_ids"] for r in packed.train), []) == sum((r["input_ids"] for r in plain.train), [])
    assert sum((r["labels"] for r in packed.train), []) == sum((r["labels"] for r in plain.train), [])
    restarts = [len(r["input_ids"]) for r in plain.train]
    positions = sum((r["position_ids"] for r in packed.train), [])
    assert positions == sum((list(range(n)) for n in restarts), [])
    assert all(len(r["input_ids"]) <= 128 for r in packed.train)
    assert packed.stats.trained_tokens == plain.stats.trained_tokens
    # With every token trained, the first token of each packed row still gets no loss: it would be predicted
    # from the previous, unrelated row.
    everything = prepare(config(path, max_len=128, packing=True, train_on="all"), chatml)
    labels = sum((r["labels"] for r in everything.train), [])
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert [labels[i] for i in starts] == [-100] * len(starts)
    assert everything.stats.trained_tokens == sum(1 for x in labels if x != -100) == len(labels) - len(starts)


def test_validation_split_is_seeded(tmp_path, chatml):
    path = jsonl(tmp_path / "d.jsonl", _rows(20))
    a = prepare(config(path, val_fraction=0.2), chatml)
    b = prepare(config(path, val_fraction=0.2), chatml)
    cfg = config(path, val_fraction=0.2)
    cfg.train.seed = 7
    c = prepare(cfg, chatml)
    assert len(a.train) == 16 and len(a.eval) == 4 and a.stats.eval_rows == 4
    assert list(a.eval) == list(b.eval) and list(a.eval) != list(c.eval)
    everything = {tuple(r["input_ids"]) for r in prepare(config(path), chatml).train}
    assert {tuple(r["input_ids"]) for r in list(a.train) + list(a.eval)} == everything


def test_validation_file(tmp_path, chatml):
    train = jsonl(tmp_path / "train.jsonl", _rows(6))
    val = jsonl(tmp_path / "val.jsonl", _rows(3, words=9))
    prepared = prepare(config(train, val_source=val, val_fraction=0.5), chatml)  # the file wins
    assert len(prepared.train) == 6 and len(prepared.eval) == 3


def test_raw_text_is_chunked_with_eos_between_documents(tmp_path, chatml):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 30 + "\n\n") * 3)
    prepared = prepare(config(str(folder), max_len=64), chatml)
    rows = list(prepared.train)
    assert prepared.stats.format == "text" and prepared.stats.train_on == "all"
    assert all(len(r["input_ids"]) == 64 for r in rows[:-1]) and 2 <= len(rows[-1]["input_ids"]) <= 64
    assert all(r["labels"] == r["input_ids"] for r in rows)
    ids = sum((r["input_ids"] for r in rows), [])
    assert ids.count(chatml.eos_token_id) == 2  # one per document (file), none between its chunks
    assert prepared.stats.trained_tokens == prepared.stats.total_tokens == len(ids)


# ---------------------------------------------------------------- stats, preview, progress

def test_stats_progress_and_html_preview(tmp_path, chatml):
    rows = [{"instruction": f"Say <b>{i}</b> & more", "output": f"<script>alert({i})</script>"} for i in range(7)]
    calls = []
    prepared = prepare(config(jsonl(tmp_path / "d.jsonl", rows)), chatml, progress=lambda d, t: calls.append((d, t)))
    s = prepared.stats
    assert (s.rows, s.format, s.columns) == (7, "alpaca", {"prompt": "instruction", "response": "output"})
    assert len(s.lengths) == 7 and s.total_tokens == sum(s.lengths)
    assert s.trained_tokens == sum(1 for r in prepared.train for label in r["labels"] if label != -100)
    assert calls[-1] == (7, 7) and all(d <= t for d, t in calls)
    d = s.to_dict()
    assert json.loads(json.dumps(d))["tokens"]["max"] == max(s.lengths)
    page = preview_html(prepared, n=2)
    assert page.count('class="lg-example"') == 2 and 'class="lg-trained"' in page and 'class="lg-masked"' in page
    assert "<script>" not in page and "&lt;script&gt;alert(0)&lt;/script&gt;" in page
    assert "Say &lt;b&gt;0&lt;/b&gt; &amp; more" in page
    # Before a model is chosen, raw conversations preview with the assistant turns marked.
    raw = preview_html([CHAT], n=1)
    assert raw.count('class="lg-example"') == 1 and ">Four.\nThe sky is blue.</span>" in raw
    assert '<span class="lg-trained" style="background:#c6f6c6;color:#0b3d0b;border-radius:2px">Hello!' in raw


# ---------------------------------------------------------------- CLI

def test_cli_json_text_and_errors(tmp_path, tiny_model_dir, capsys):
    from core.__main__ import main

    path = jsonl(tmp_path / "d.jsonl", [{"question": "Hi?", "answer": "Hello."}] * 3)
    assert main(["data", path, "--model", str(tiny_model_dir), "--json", "--max-len", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "pairs" and out["rows"] == 3
    assert out["columns"] == {"prompt": "question", "response": "answer"} and out["tokens"]["max_len"] == 64
    assert main(["data", path, "--model", str(tiny_model_dir)]) == 0
    text = capsys.readouterr().out
    assert "format    pairs" in text and "prompt <- question" in text and "⟦Hello.<|im_end|>⟧" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": \n')
    assert main(["data", str(bad), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and "fix:" in err and "Traceback" not in err


# ---------------------------------------------------------------- the built-in model and demo

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from the shipped GGUF (no conversion)."""
    from transformers import AutoTokenizer

    from core.models import builtin_gguf
    from core.paths import models_dir

    converted = models_dir() / "smollm2-135m-instruct"
    if (converted / "CONVERTED").exists():  # another test converted the built-in model already: reuse it
        return AutoTokenizer.from_pretrained(str(converted))
    gguf = builtin_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.slow  # reads SmolLM2's tokenizer from the GGUF: ~10 s of CPU, more on a busy machine
def test_demo_dataset_fits_the_cpu_demo_preset_with_smollm2(smollm2_tokenizer):
    from core.presets import load

    cfg = load("cpu-demo")
    assert cfg.data.source == "builtin:demo-identity" and cfg.data.max_len == 256
    prepared = prepare(cfg, smollm2_tokenizer)
    s = prepared.stats
    assert s.truncated == 0 and s.dropped == 0 and max(s.lengths) <= 256 and not s.template_is_default
    assert len(prepared.train) == s.rows >= 60
    rows, _, _ = load_rows(cfg.data.source)
    for row, conv in zip(prepared.train, rows):  # the injected system prompt, user turns and headers are masked
        expected = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        assert trained_runs(smollm2_tokenizer, row) == expected
