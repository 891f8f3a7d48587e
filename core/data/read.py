"""Reading dataset sources into plain records (dicts), one at a time.

A source is a file, a folder of files, `builtin:demo-identity`, or a Hugging Face hub id (owner/name). Records
come out with a `Where` (file, line or row) so every later error can say exactly which row is bad. JSONL, CSV,
TSV, Parquet and text files are streamed; a .json file has to be parsed whole.
Everything that goes wrong becomes a DatasetError naming the file and the line: never a bare exception.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from urllib.parse import urlparse
import socket
from core.errors import DatasetError

BUILTIN_DATA = Path(__file__).resolve().parent.parent / "builtin_data"
BUILTINS = {"builtin:demo-identity": BUILTIN_DATA / "demo_identity.jsonl",
            "builtin:demo-preference": BUILTIN_DATA / "demo_preference.jsonl",
            "builtin:demo-arithmetic": BUILTIN_DATA / "demo_arithmetic.jsonl",
            "builtin:demo-arithmetic-eval": BUILTIN_DATA / "demo_arithmetic_eval.jsonl"}
SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TEXT_CHUNK = 8000  # characters per text record: big enough for context, small enough to tokenise in batches
_MARKUP = ("<!doctype", "<html", "<svg", "<?xml", "<head", "<body", "<!--")


@dataclass(frozen=True)
class Where:
    """Where a record came from, for error messages."""

    file: str
    line: int | None = None  # 1-based line in a text file
    row: int | None = None   # 1-based row in a JSON array / Parquet file / hub dataset

    def error(self, message: str, hint: str = "") -> DatasetError:
        if self.line is None and self.row is not None:
            message = f"row {self.row}: {message}"
        return DatasetError(message, hint, file=self.file, line=self.line)


def is_hub_id(source: str) -> bool:
    """owner/name that is not a local path and does not end like a file we read."""
    s = source.strip()
    return (bool(_HUB_ID.match(s)) and not Path(s).expanduser().exists()
            and not s.lower().endswith(SUPPORTED))


def iter_records(source: str, split: str = "train", subset: str = "") -> Iterator[tuple[dict, Where]]:
    """Every record of a source, in order, with where it came from."""
    source = (source or "").strip()
    if not source:
        raise DatasetError("no dataset chosen", "give a file, a folder, a hub id or builtin:demo-identity")
    if source.startswith("builtin:"):
        if source not in BUILTINS:
            raise DatasetError(f"unknown built-in dataset {source!r}", f"built-in datasets: {', '.join(BUILTINS)}")
        yield from iter_file(BUILTINS[source])
        return
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _iter_folder(path)
    elif path.exists():
        yield from iter_file(path)
    elif is_hub_id(source):
        yield from _iter_hub(source, split, subset)
    else:
        raise DatasetError(f"file not found: {source}",
                           "check the path, or give a hub dataset id like owner/name")


def estimate_total(source: str) -> int:
    """A cheap guess at the number of records (for progress bars); 0 when unknown."""
    path = BUILTINS.get(source.strip(), Path(source.strip()).expanduser())
    try:
        if path.is_file() and path.suffix.lower() in (".jsonl", ".csv", ".tsv"):
            with open(path, "rb") as fh:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        if path.is_file() and path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq  # heavy

            return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - only a progress estimate; the real read reports real errors
        return 0
    return 0


def _iter_folder(folder: Path) -> Iterator[tuple[dict, Where]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DatasetError(f"no data files in folder {folder}", f"put {', '.join(SUPPORTED)} files in it")
    for f in files:
        yield from iter_file(f)


def iter_file(path: Path) -> Iterator[tuple[dict, Where]]:
    """Records of one file, chosen by its extension (content sniffing for unknown ones)."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        suffix = _sniff(path)
    readers = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".tsv": _iter_csv,
               ".parquet": _iter_parquet, ".txt": _iter_text, ".md": _iter_text}
    count = 0
    for item in readers[suffix](path):
        count += 1
        yield item
    if count == 0:
        what = "the file is empty" if path.stat().st_size == 0 else "the file has no rows"
        raise DatasetError(what, "check that this is the file you meant", file=str(path))


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"PAR1"):
        return ".parquet"
    first = head.lstrip(codecs.BOM_UTF8).lstrip()[:1]
    if first in (b"{", b"["):
        return ".jsonl" if first == b"{" else ".json"
    raise DatasetError(f"unsupported file type {path.suffix or '(no extension)'!r}",
                       f"use one of {', '.join(SUPPORTED)}", file=str(path))


# ---------------------------------------------------------------- text decoding

def _encoding(path: Path, head: bytes) -> str:
    """utf-8 unless a byte-order mark says otherwise; binary files and BOM-less UTF-16 are errors."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if b"\x00" in head:
        # ASCII-range UTF-16 has a zero in every other byte, and (almost) none in the others.
        half = max(1, len(head) // 2)
        odd, even = head[1::2].count(0) / half, head[0::2].count(0) / half
        if len(head) > 8 and ((odd > 0.4 and even < 0.05) or (even > 0.4 and odd < 0.05)):
            raise DatasetError("this looks like UTF-16 text without a byte-order mark",
                               "save the file as UTF-8 (in Excel: CSV UTF-8)", file=str(path))
        raise DatasetError("this is a binary file, not text", "give a text file (.jsonl, .csv, ...) or .parquet",
                           file=str(path))
    return "utf-8"


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4096)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line, decoded strictly so a bad byte is reported at its line."""
    enc = _encoding(path, _read_head(path))
    if enc in ("utf-16", "utf-32"):  # newlines are multi-byte: let the codec split lines
        with open(path, encoding=enc, errors="strict", newline=None) as fh:
            try:
                yield from enumerate(fh, 1)
            except UnicodeDecodeError as e:
                raise DatasetError(f"not valid {enc} text ({e.reason})", "save the file as UTF-8", file=str(path))
        return
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = raw.decode(enc if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                                   "save the file as UTF-8 (in Excel: CSV UTF-8)", file=str(path), line=n)
            yield n, text


def _reject_markup(text: str, path: Path, kind: str, line: int | None = 1) -> None:
    start = text.lstrip("\ufeff \t\r\n")[:20].lower()
    if start.startswith(_MARKUP) or (kind.startswith("JSON") and start.startswith("<")):
        raise DatasetError(f"this looks like an HTML/XML/SVG file (starts with {start[:12].strip()!r}), not {kind}",
                           "check that you picked the right file", file=str(path), line=line)


# ---------------------------------------------------------------- JSON and JSON Lines

def _iter_jsonl(path: Path) -> Iterator[tuple[dict, Where]]:
    first = True
    for n, text in _text_lines(path):
        if not text.strip():
            continue
        if first:
            _reject_markup(text, path, "JSON Lines", n)
            if text.lstrip("\ufeff \t").startswith("["):  # a JSON array saved as .jsonl: read it as JSON
                yield from _iter_json(path)
                return
            first = False
        try:
            record = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DatasetError(f"line {n} is not valid JSON ({_json_reason(e)})",
                               "each line must be one complete JSON object like {\"prompt\": ..., \"completion\": ...}",
                               file=str(path), line=n)
        if not isinstance(record, dict):
            raise DatasetError(f"expected a JSON object on each line, got {kind_of(record)}",
                               "write one {...} object per line", file=str(path), line=n)
        yield record, Where(str(path), line=n)


def _iter_json(path: Path) -> Iterator[tuple[dict, Where]]:
    head = _read_head(path)
    try:
        text = path.read_bytes().decode(_encoding(path, head))
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8", file=str(path))
    if not text.strip():
        raise DatasetError("the file is empty", "check that this is the file you meant", file=str(path))
    _reject_markup(text, path, "JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines saved as .json
            yield from _iter_jsonl(path)
            return
        raise DatasetError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                           "the file may be cut off or hand-edited; check it at that line", file=str(path), line=e.lineno)
    except (ValueError, RecursionError) as e:
        raise DatasetError(f"not valid JSON ({_json_reason(e)})", "check the file", file=str(path))
    del text
    for i, record in enumerate(_json_rows(data, path), 1):
        if not isinstance(record, dict):
            raise DatasetError(f"row {i}: expected a JSON object, got {kind_of(record)}",
                               "the array must hold objects like {\"instruction\": ..., \"output\": ...}", file=str(path))
        yield record, Where(str(path), row=i)


def _json_rows(data, path: Path) -> list:
    """An array of objects, an object holding one (e.g. {"train": [...]}), or columns ({"a": [...], "b": [...]})."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data:
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1 \
                and not any(isinstance(x, dict) for v in lists.values() for x in v[:1]):
            keys = list(lists)
            return [dict(zip(keys, values)) for values in zip(*lists.values())]
        row_lists = {k: v for k, v in lists.items() if v and isinstance(v[0], dict) and not _is_turns(v)}
        for key in ("train", "data", "rows", "examples", "records"):
            if key in row_lists:
                return row_lists[key]
        if len(row_lists) == 1:
            return next(iter(row_lists.values()))
        if not row_lists:
            return [data]  # a single example, e.g. {"messages": [...]}
    raise DatasetError(f"expected a JSON array of objects or an object of arrays, got {kind_of(data)}",
                       "write [{...}, {...}] or {\"column\": [...], ...}", file=str(path))


def _is_turns(items: list) -> bool:
    first = items[0]
    return ("role" in first and "content" in first) or ("from" in first and "value" in first)


def _json_reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)[:100]


def kind_of(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# ---------------------------------------------------------------- CSV, Parquet, text

def _iter_csv(path: Path) -> Iterator[tuple[dict, Where]]:
    enc = _encoding(path, _read_head(path))
    # Long text cells are normal in training data; the csv module's default limit is 128 KiB per field.
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding=enc, errors="strict", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DatasetError("the file is empty (no header row)", "the first line must name the columns",
                                   file=str(path), line=1)
            _reject_markup(",".join(header), path, "CSV")
            header = [h.strip() for h in header]
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise DatasetError(f"expected {len(header)} fields like the header, found {len(cells)}",
                                       "quote cells that contain the delimiter or line breaks",
                                       file=str(path), line=reader.line_num)
                yield dict(zip(header, cells)), Where(str(path), line=reader.line_num)
        except csv.Error as e:
            raise DatasetError(f"not valid CSV: {e}", "check the quoting on that line", file=str(path),
                               line=reader.line_num)
        except UnicodeDecodeError as e:
            raise DatasetError(f"not valid {enc} text ({e.reason})", "save the file as UTF-8 (in Excel: CSV UTF-8)",
                               file=str(path), line=reader.line_num + 1)


def _iter_parquet(path: Path) -> Iterator[tuple[dict, Where]]:
    import pyarrow as pa  # heavy
    import pyarrow.parquet as pq  # heavy

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield record, Where(str(path), row=row)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError(f"could not read Parquet data: {str(e)[:200]}",
                           "check that this is a complete .parquet file", file=str(path))


def _iter_text(path: Path) -> Iterator[tuple[dict, Where]]:
    """Raw text in chunks of ~8000 characters cut at blank lines; `_eos` marks the end of the document."""
    buf: list[str] = []
    size, start, pending = 0, 1, None
    for n, line in _text_lines(path):
        buf.append(line)
        size += len(line)
        if size >= _TEXT_CHUNK and (not line.strip() or size >= 8 * _TEXT_CHUNK):
            if pending:
                yield pending
            pending = ({"text": "".join(buf), "_eos": False}, Where(str(path), line=start))
            buf, size, start = [], 0, n + 1
    tail = "".join(buf)
    if pending and not tail.strip():
        pending[0]["_eos"] = True
        yield pending
        return
    if pending:
        yield pending
    if tail.strip():
        yield {"text": tail, "_eos": True}, Where(str(path), line=start)


# ---------------------------------------------------------------- Hugging Face hub

def _iter_hub(repo_id: str, split: str, subset: str) -> Iterator[tuple[dict, Where]]:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not _hub_reachable():
        raise DatasetError(f"hub not reachable: cannot download {repo_id}",
                           "check your network, or download the data and give a local file")
    import datasets  # heavy

    try:
        ds = datasets.load_dataset(repo_id, subset or None, split=split or "train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all become one user error
        reason = f"{type(e).__name__}: {str(e)[:300]}"
        if offline:
            raise DatasetError(f"hub not reachable (offline mode) and {repo_id} is not in the local cache ({reason})",
                               "unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or give a local file")
        raise DatasetError(f"could not load {repo_id} (split {split!r}, subset {subset or 'default'!r}): {reason}",
                           "check the id, split and subset on the dataset's hub page")
    where = f"{repo_id}[{split}]"
    for i, record in enumerate(ds, 1):
        yield dict(record), Where(where, row=i)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: fails in seconds instead of hanging in retries."""

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False

