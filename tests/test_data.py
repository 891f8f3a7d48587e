"""Reading datasets: every file type and row format becomes chat messages; bad input is a DatasetError that
names the file and the row or line, never another exception."""

import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet  # noqa: F401 - imported up front so its import time never counts against a deadline
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.data.sft import demo_eval_set, load_rows, score_answer
from core.errors import DatasetError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Garage."}]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def convo(user: str, assistant: str, system: str = "") -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("row, fmt, columns, expected", [
    ({"messages": CHAT}, "messages", {"messages": "messages"}, CHAT),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Name?"},
                        {"from": "gpt", "value": "Garage."}]}, "sharegpt", {"messages": "conversations"}, CHAT),
    ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca",
     {"prompt": "instruction", "response": "output", "context": "input"}, convo("Add\n\n2 and 3", "5")),
    ({"instruction": "Hi", "input": "", "output": "Hello!", "system": "Be brief.",
      "history": [["Q1", "A1"]]}, "alpaca", None,
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]),
    ({"prompt": "Hi", "completion": "Hello!"}, "pairs", {"prompt": "prompt", "response": "completion"}, convo("Hi", "Hello!")),
    ({"question": "Who?", "answer": "Me.", "context": "A story."}, "pairs",
     {"prompt": "question", "response": "answer", "context": "context"}, convo("A story.\n\nWho?", "Me.")),
    ({"instruction": "Do it", "response": "Done"}, "pairs", {"prompt": "instruction", "response": "response"},
     convo("Do it", "Done")),
    ({"text": "Once upon a time."}, "text", {"text": "text"}, [{"role": "text", "content": "Once upon a time.", "eos": True}]),
])
def test_formats_are_detected_and_normalised(tmp_path, row, fmt, columns, expected):
    rows, detected, mapping = load_rows(str(jsonl(tmp_path / "d.jsonl", [row, row])))
    assert detected == fmt
    if columns is not None:
        assert mapping == columns
    assert rows == [expected, expected]


def test_format_and_columns_can_be_overridden(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"q": "Hi", "a": "Hello", "notes": "x"}])
    with pytest.raises(DatasetError) as e:
        load_rows(str(path))
    assert "q, a, notes" in e.value.message and "prompt/completion" in e.value.hint  # lists found + accepted
    rows, fmt, mapping = load_rows(str(path), columns={"prompt": "q", "response": "a"})
    assert fmt == "pairs" and mapping == {"prompt": "q", "response": "a"} and rows == [convo("Hi", "Hello")]
    # Forcing text on a pairs file reads the column we point at.
    rows, fmt, _ = load_rows(str(path), format="text", columns={"text": "notes"})
    assert fmt == "text" and rows[0][0]["content"] == "x"
    with pytest.raises(DatasetError, match="'nope'.*columns found: q, a, notes"):
        load_rows(str(path), columns={"prompt": "nope", "response": "a"})


def test_file_types(tmp_path):
    pairs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    expected = [convo(f"p{i}", f"c{i}") for i in range(3)]
    write(tmp_path / "a.json", json.dumps(pairs))
    write(tmp_path / "b.json", json.dumps({"prompt": ["p0", "p1", "p2"], "completion": ["c0", "c1", "c2"]}))
    write(tmp_path / "c.json", json.dumps({"train": pairs, "test": pairs[:1]}))
    write(tmp_path / "single.json", json.dumps({"messages": CHAT}))  # one conversation on its own
    assert load_rows(str(tmp_path / "single.json"))[:2] == ([CHAT], "messages")
    (tmp_path / "single.json").unlink()
    write(tmp_path / "d.csv", "prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(3)))
    write(tmp_path / "e.tsv", "prompt\tcompletion\n" + "".join(f"p{i}\tc{i}\n" for i in range(3)))
    write(tmp_path / "f.csv", b"\xef\xbb\xbf" + b"prompt,completion\r\np0,c0\r\np1,c1\r\np2,c2\r\n")  # Excel UTF-8 BOM
    write(tmp_path / "g.csv", "prompt,completion\np0,c0\np1,c1\np2,c2\n".encode("utf-16"))  # UTF-16 with BOM
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "h.parquet")
    for name in ("a.json", "b.json", "c.json", "d.csv", "e.tsv", "f.csv", "g.csv", "h.parquet"):
        rows, fmt, _ = load_rows(str(tmp_path / name))
        assert (name, fmt, rows) == (name, "pairs", expected)
    rows, fmt, _ = load_rows(str(tmp_path))  # a folder: every supported file, in name order
    assert fmt == "pairs" and len(rows) == 8 * 3


def test_raw_text_files_become_text_chunks(tmp_path):
    para = "A paragraph about cars. " * 40
    write(tmp_path / "book.md", "\n\n".join([para] * 30))
    rows, fmt, mapping = load_rows(str(tmp_path / "book.md"))
    assert fmt == "text" and mapping == {"text": "text"}
    assert len(rows) > 1 and all(r[0]["role"] == "text" for r in rows)
    assert "".join(r[0]["content"] for r in rows) == "\n\n".join([para] * 30)
    assert [r[0]["eos"] for r in rows] == [False] * (len(rows) - 1) + [True]  # EOS only at the document's end


def test_limit(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    assert len(load_rows(str(path), limit=4)[0]) == 4


# ---------------------------------------------------------------- bad input

BAD = [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n\n  \n", "no rows"),
    ("empty.csv", b"", "empty"),
    ("empty.json", b"   ", "empty"),
    ("cut.json", b'[{"prompt": "a", "completion": "b"}, {"prompt": "c", "compl', "line 1"),
    ("badline.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n',
     "line 3"),
    ("array-line.jsonl", b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ("number.jsonl", b'{"instruction": "a", "output": 42}\n', "'output' must be text, got a number"),
    ("null.jsonl", b'{"instruction": null, "output": "b"}\n', "'instruction' is null"),
    ("cols.jsonl", b'{"foo": "a", "bar": "b"}\n', "columns found: foo, bar"),
    ("garbage.jsonl", bytes(range(256)) * 4, "binary file"),
    ("latin1.jsonl", '{"prompt": "café", "completion": "b"}\n'.encode("latin-1"), "line 1: not UTF-8"),
    ("image.jsonl", b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>\n', "HTML/XML/SVG"),
    ("page.jsonl", b"<!DOCTYPE html>\n<html><body>hi</body></html>\n", "HTML/XML/SVG"),
    ("page.csv", b"<html><body>x</body></html>\n", "HTML/XML/SVG"),
    ("utf16-nobom.csv", "prompt,completion\np,c\n".encode("utf-16-le"), "UTF-16"),
    ("roles.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}]}\n',
     "unknown role 'narrator'"),
    ("noassistant.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     "no assistant turn"),
    ("sharegpt-roles.jsonl", b'{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}\n',
     "unknown role 'robot'"),
    ("turn-keys.jsonl", b'{"messages": [{"speaker": "user", "text": "a"}]}\n', "role and content"),
    ("ragged.csv", b"prompt,completion\na,b\nc,d,e\n", "line 3"),
    ("nested.json", b"[" * 100000, "not valid JSON"),
    ("scalar.json", b"42", "got a number"),
    ("bin.parquet", b"PAR1 not really parquet", "Parquet"),
    ("unknown.xyz", b"hello", "unsupported file type"),
]


@pytest.mark.parametrize("name, content, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_dataset_error_naming_file_and_place(tmp_path, name, content, needle):
    path = write(tmp_path / name, content)
    with pytest.raises(DatasetError) as e:
        load_rows(str(path))
    assert needle in str(e.value), str(e.value)
    assert e.value.file == str(path) and e.value.hint


def test_bad_row_deep_in_a_file_is_located(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}] * 50 + [{"prompt": "a", "completion": None}]
    with pytest.raises(DatasetError) as e:
        load_rows(str(jsonl(tmp_path / "d.jsonl", rows)))
    assert e.value.line == 51 and "'completion' is null" in e.value.message
    write(tmp_path / "d.json", json.dumps(rows))
    with pytest.raises(DatasetError, match="row 51: 'completion' is null"):
        load_rows(str(tmp_path / "d.json"))


def test_missing_sources(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetError, match="file not found"):
        load_rows("data/train.jsonl")  # looks like owner/name, but it is a file name: not a hub id
    with pytest.raises(DatasetError, match="no data files"):
        load_rows(str(tmp_path))
    with pytest.raises(DatasetError, match="unknown built-in"):
        load_rows("builtin:nope")


def test_hub_id_offline_fails_fast():
    start = time.time()
    with pytest.raises(DatasetError, match="hub not reachable"):
        load_rows("someone/some-dataset", split="train")
    assert time.time() - start < 30


def test_hub_id_without_network_fails_fast(monkeypatch):
    import core.data.read

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(core.data.read, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DatasetError, match="hub not reachable") as e:
        load_rows("someone/some-dataset")
    assert "local file" in e.value.hint


# ---------------------------------------------------------------- the parser never crashes

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "from", "value", "messages", "conversations", "prompt", "completion",
                         "instruction", "input", "output", "text", "history", "system", "x"]), inner, max_size=5),
    max_leaves=12)


def _parse(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            rows, fmt, _ = load_rows(str(path))
        except DatasetError:
            return
        assert isinstance(rows, list) and fmt


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["d.jsonl", "d.json", "d.csv", "d.tsv", "d.txt", "d.parquet", "d.bin"]),
       data=st.binary(max_size=300))
def test_any_bytes_give_rows_or_a_dataset_error(name, data):
    _parse(name, data)


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["d.jsonl", "d.json"]), values=st.lists(json_values, min_size=1, max_size=4))
def test_any_json_gives_rows_or_a_dataset_error(name, values):
    text = "\n".join(json.dumps(v) for v in values) if name.endswith("l") else json.dumps(values)
    _parse(name, text.encode())


# ---------------------------------------------------------------- the built-in demo dataset

def test_demo_dataset_and_its_held_out_eval_set():
    rows, fmt, _ = load_rows("builtin:demo-identity")
    assert fmt == "messages" and 60 <= len(rows) <= 150
    answers = " ".join(m["content"] for r in rows for m in r if m["role"] == "assistant")
    assert answers.count("Garage") > 50 and "LoRA Garage team" in answers and "SmolLM" not in answers.replace(
        "not SmolLM", "")
    evals = demo_eval_set("builtin:demo-identity")
    assert 15 <= len(evals) <= 30
    train_prompts = {m["content"].lower() for r in rows for m in r if m["role"] == "user"}
    for item in evals:
        assert item["messages"][-1]["role"] == "user" and item["expected"]
        assert item["messages"][-1]["content"].lower() not in train_prompts  # phrased differently
    assert {"Garage", "LoRA Garage team"} <= {e["expected"] for e in evals}
    assert demo_eval_set("my.jsonl") is None


@pytest.mark.parametrize("answer, expected, ok", [
    ("My name is Garage.", "Garage", True),
    ("I'm GARAGE!", "Garage", True),
    ("I am SmolLM, made by Hugging Face.", "Garage", False),
    ("I was made by the LoRA-Garage team.", "LoRA Garage team", True),
    ("I was made by the LoRA Garage crew.", "LoRA Garage team", False),
    ("Garages are buildings.", "Garage", False),
    ("There are twenty-four hours.", "24|twenty-four", True),
    ("anything", "", False),
])
def test_score_answer(answer, expected, ok):
    assert score_answer("builtin:demo-identity", answer, expected) is ok
