import json
from pathlib import Path

from core.config import RunConfig


WEATHER = {"name": "get_weather", "description": "Weather now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


SHAREGPT_TOOLS = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": '{"temp": 20}'},
    {"from": "gpt", "value": "It is 20 degrees."}],
    "tools": json.dumps([WEATHER])}


PREFERENCE = [{"conversations": [{"from": "human", "value": "Hi"}],
               "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}}]


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def config(source: str, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.source = source
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg.validate()
