"""Datasets in the wild (issue 17): tool calls, content parts, reasoning, loss_weight, {{placeholders}}, and
columns that change what a row means. Each shape is written here, rendered through a template with tool
support and one without, and its loss mask is checked token by token on the tiny tokenizer."""

import json

import pytest

from core.config import RunConfig, apply_overrides
from core.data.sft import load_rows, prepare
from core.errors import ConfigError, DatasetError
from tests.helpers.tiny import CHATML, CHATML_TOOLS, tiny_tokenizer
from tests.helpers.data import config, jsonl
from tests.helpers.data import PREFERENCE, SHAREGPT_TOOLS, WEATHER

WEATHER_JSON = json.dumps({"type": "function", "function": WEATHER})
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
PLAIN_HEADER = ("You can call these tools (JSON schemas):\n<tools>\n" + WEATHER_JSON + "\n</tools>\n"
                'To call a tool, reply with <tool_call>{"name": ..., "arguments": {...}}</tool_call>; '
                "its result comes back inside <tool_response></tool_response>.")

OPENAI_TOOLS = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
    {"role": "assistant", "content": "It is 20 degrees."}],
    "tools": [{"type": "function", "function": WEATHER}]}
CONTENT_PARTS = {"messages": [
    {"role": "user", "content": [{"type": "text", "value": "Hi "}, {"type": "text", "value": "there"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]}
REASONING = {"messages": [
    {"role": "user", "content": [{"type": "text", "value": "What is two plus two?"}]},
    {"role": "assistant", "content": [{"type": "reasoning", "value": "2 and 2 make 4."},
                                      {"type": "text", "value": "Four."}]}]}
LOSS_WEIGHT = {"messages": [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad answer.", "loss_weight": 0},
    {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Good answer.", "loss_weight": 1}]}
PLACEHOLDERS = {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."}

TOOL_TURNS = ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>" + CALL
              + '</tool_call><|im_end|>\n<|im_start|>tool\n{"temp": 20}<|im_end|>\n'
              "<|im_start|>assistant\nIt is 20 degrees.<|im_end|>\n")
PLAIN_TURNS = ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n" + CALL
               + "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 20}\n</tool_response>"
               "<|im_end|>\n<|im_start|>assistant\nIt is 20 degrees.<|im_end|>\n")

# shape: (row, fill, format, {template: (rendered text, trained pieces in order, stats.tools, stats.reasoning)})
SHAPES = {
    "sharegpt-tools": (SHAREGPT_TOOLS, {}, "sharegpt", {
        "tools": ("<|im_start|>system\n# Tools\n<tools>" + WEATHER_JSON + "</tools><|im_end|>\n" + TOOL_TURNS,
                  [f"<tool_call>{CALL}</tool_call><|im_end|>", "It is 20 degrees.<|im_end|>"], "template", ""),
        "plain": ("<|im_start|>system\n" + PLAIN_HEADER + "<|im_end|>\n" + PLAIN_TURNS,
                  [f"<tool_call>\n{CALL}\n</tool_call><|im_end|>", "It is 20 degrees.<|im_end|>"], "plain text", "")}),
    "openai-tools": (OPENAI_TOOLS, {}, "messages", {
        "tools": ("<|im_start|>system\nBe brief.\n\n# Tools\n<tools>" + WEATHER_JSON + "</tools><|im_end|>\n"
                  + TOOL_TURNS,
                  [f"<tool_call>{CALL}</tool_call><|im_end|>", "It is 20 degrees.<|im_end|>"], "template", ""),
        "plain": ("<|im_start|>system\nBe brief.\n\n" + PLAIN_HEADER + "<|im_end|>\n" + PLAIN_TURNS,
                  [f"<tool_call>\n{CALL}\n</tool_call><|im_end|>", "It is 20 degrees.<|im_end|>"], "plain text", "")}),
    "content-parts": (CONTENT_PARTS, {}, "messages", {
        t: ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
            ["Hello!<|im_end|>"], "", "") for t in ("tools", "plain")}),
    "reasoning": (REASONING, {}, "messages", {
        "tools": ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
                  "<think>2 and 2 make 4.</think>\nFour.<|im_end|>\n",
                  ["<think>2 and 2 make 4.</think>\nFour.<|im_end|>"], "", "reasoning_content"),
        "plain": ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n",
                  ["Four.<|im_end|>"], "", "dropped")}),
    "loss-weight": (LOSS_WEIGHT, {}, "messages", {
        t: ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nBad answer.<|im_end|>\n<|im_start|>user\n"
            "Again?<|im_end|>\n<|im_start|>assistant\nGood answer.<|im_end|>\n",
            ["Good answer.<|im_end|>"], "", "") for t in ("tools", "plain")}),
    "placeholders": (PLACEHOLDERS, {"name": "Garage"}, "alpaca", {
        t: ("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am Garage, made by {{author}}."
            "<|im_end|>\n", ["I am Garage, made by {{author}}.<|im_end|>"], "", "") for t in ("tools", "plain")}),
}
TEMPLATES = {"tools": CHATML_TOOLS, "plain": CHATML}


@pytest.fixture(scope="module")
def toks():
    return {name: tiny_tokenizer(t) for name, t in TEMPLATES.items()}


def expected_tokens(tok, text: str, pieces: list[str]) -> tuple[list[int], list[bool]]:
    """The token ids of `text`, and for each token whether it lies inside one of `pieces` (found in order)."""
    spans, pos = [], 0
    for piece in pieces:
        start = text.index(piece, pos)
        spans.append((start, start + len(piece)))
        pos = start + len(piece)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], trained


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shape_is_detected_rendered_and_masked_token_by_token(tmp_path, toks, shape, template):
    row, fill, fmt, by_template = SHAPES[shape]
    text, pieces, tools, reasoning = by_template[template]
    tok = toks[template]
    prepared = prepare(config(jsonl(tmp_path / "d.jsonl", [row]), fill=fill), tok)
    (got,) = prepared.train
    assert prepared.stats.format == fmt
    assert tok.decode(got["input_ids"], skip_special_tokens=False) == text
    ids, trained = expected_tokens(tok, text, pieces)
    assert got["input_ids"] == ids
    assert [label != -100 for label in got["labels"]] == trained
    assert all(label in (-100, t) for label, t in zip(got["labels"], got["input_ids"]))
    assert (prepared.stats.tools, prepared.stats.reasoning) == (tools, reasoning)
    assert prepared.stats.trained_tokens == sum(trained)
    assert [t for t, on in prepared.samples[0] if on] == pieces  # the preview marks the same text


def test_tool_rendering_is_reported(tmp_path, toks):
    source = jsonl(tmp_path / "d.jsonl", [OPENAI_TOOLS])
    assert not any("tool" in w for w in prepare(config(source), toks["tools"]).stats.warnings)
    warnings = prepare(config(source), toks["plain"]).stats.warnings
    assert any("tool calls rendered as plain text" in w for w in warnings)
    assert any("reasoning parts dropped" in w for w in prepare(config(jsonl(tmp_path / "r.jsonl", [REASONING])),
                                                               toks["plain"]).stats.warnings)


def test_train_on_all_renders_tools_too(tmp_path, toks):
    prepared = prepare(config(jsonl(tmp_path / "d.jsonl", [SHAREGPT_TOOLS]), train_on="all"), toks["plain"])
    (row,) = prepared.train
    assert toks["plain"].decode(row["input_ids"]).endswith(PLAIN_TURNS)
    assert all(label != -100 for label in row["labels"])


def test_load_rows_gives_the_normalised_tool_conversation(tmp_path):
    (conv,), fmt, mapping = load_rows(jsonl(tmp_path / "d.jsonl", [SHAREGPT_TOOLS]))
    assert (fmt, mapping) == ("sharegpt", {"messages": "conversations", "tools": "tools"})
    assert conv.tools == [{"type": "function", "function": WEATHER}]
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["tool_calls"] == [{"type": "function",
                                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    # a reply and then its call, written as two ShareGPT turns, is one assistant turn
    row = {"conversations": [{"from": "human", "value": "Paris?"}, {"from": "gpt", "value": "Let me look."},
                             {"from": "function_call", "value": CALL}, {"from": "observation", "value": "20"},
                             {"from": "gpt", "value": "20."}]}
    (conv,), _, _ = load_rows(jsonl(tmp_path / "two.jsonl", [row]))
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["content"] == "Let me look." and conv[1]["tool_calls"][0]["function"]["name"] == "get_weather"


# ---------------------------------------------------------------- placeholders

def test_placeholders_are_listed_and_filled(tmp_path, toks):
    source = jsonl(tmp_path / "identity.jsonl", [PLACEHOLDERS, PLACEHOLDERS])
    stats = prepare(config(source), toks["plain"]).stats
    assert stats.placeholders == {"name": 2, "author": 2} and stats.filled == {}
    assert any("{{name}} (2 rows)" in w and "data.fill" in w for w in stats.warnings)
    cfg = apply_overrides(config(source), ["data.fill.name=Garage", "data.fill.author=Ann Lee"]).validate()
    prepared = prepare(cfg, toks["plain"])
    assert prepared.stats.filled == {"name": "Garage", "author": "Ann Lee"}
    assert not any("placeholders" in w for w in prepared.stats.warnings)
    assert [t for t, on in prepared.samples[0] if on] == ["I am Garage, made by Ann Lee.<|im_end|>"]


@pytest.mark.parametrize("override, needle", [
    ("data.fill.na-me=x", "not a placeholder name"),
    ("data.fill.name=", "no value given for {{name}}"),
])
def test_fill_is_validated(override, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), [override]).validate()
    assert e.value.field == "data.fill" and needle in str(e.value)


def test_cli_fills_placeholders(tmp_path, tiny_model_dir, capsys):
    from core.__main__ import main

    source = jsonl(tmp_path / "identity.jsonl", [PLACEHOLDERS])
    assert main(["data", source, "--model", str(tiny_model_dir), "--set", "data.fill.name=Garage", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["placeholders"] == {"name": 1, "author": 1} and out["filled"] == {"name": "Garage"}
    assert main(["data", source, "--model", str(tiny_model_dir)]) == 0
    assert "{{name}} in 1 rows: not filled" in capsys.readouterr().out
    assert main(["data", source, "--model", str(tiny_model_dir), "--set", "lora.r=4"]) == 2
    assert "only data.* settings" in capsys.readouterr().err


# ---------------------------------------------------------------- columns that change what a row means

KTO = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "label": True},
       {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}], "label": False}]
IMAGES = [{"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}],
           "images": ["cat.png"]}]
PREFERENCE_PAIRS = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]


@pytest.mark.parametrize("rows, needles", [
    (KTO, ["column 'label' marks each row good (true) or bad (false)", "keep only the rows with label=true"]),
    (IMAGES, ["column 'images' holds images: this app trains text models only", "remove the 'images' column"]),
    (PREFERENCE, ["preference pairs (chosen / rejected), and train.objective is sft", "train.objective=dpo"]),
    (PREFERENCE_PAIRS, ["preference pairs (chosen / rejected)", "{prompt: prompt, response: chosen}"]),
    ([{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                    {"role": "assistant", "content": "A cat."}]}],
     ["content part 1 has type 'image_url', which is not text", "remove the 'image_url' parts"]),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "loss_weight": 0.5}]}],
     ["loss_weight must be 0 (no loss) or 1 (trained), got 0.5"]),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "loss_weight": 0}]}],
     ["every assistant turn has loss_weight 0"]),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "20"},
                    {"role": "assistant", "content": "Yo"}]}], ["no tool call comes before it"]),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}],
     ["the arguments of 'f' is not valid JSON"]),
])
def test_rows_whose_meaning_we_cannot_keep_are_refused(tmp_path, rows, needles):
    with pytest.raises(DatasetError) as e:
        load_rows(jsonl(tmp_path / "d.jsonl", rows))
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert e.value.hint and e.value.line == 1


def test_a_later_row_with_a_meaningful_column_is_refused_too(tmp_path):
    rows = [{"messages": KTO[0]["messages"]}, KTO[1]]
    with pytest.raises(DatasetError) as e:
        load_rows(jsonl(tmp_path / "d.jsonl", rows))
    assert e.value.line == 2 and "'label'" in str(e.value)


def test_ignored_columns_are_listed_and_removed_media_is_allowed(tmp_path, toks):
    rows = [{"instruction": "Hi", "output": "Hello!", "id": 7, "source": "web", "images": []},
            {"instruction": "<image>Hi", "output": "Hello!", "id": 8, "source": "web"}]
    prepared = prepare(config(jsonl(tmp_path / "d.jsonl", rows)), toks["plain"])
    assert prepared.stats.ignored_columns == ["id", "source", "images"]
    assert any("columns not used for training: id, source, images" in w for w in prepared.stats.warnings)
    assert any("1 rows contain <image>" in w for w in prepared.stats.warnings)


def test_preference_file_trains_when_the_chosen_reply_is_mapped(tmp_path):
    rows, fmt, mapping = load_rows(jsonl(tmp_path / "d.jsonl", PREFERENCE_PAIRS),
                                   columns={"prompt": "prompt", "response": "chosen"})
    assert fmt == "pairs" and rows == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
