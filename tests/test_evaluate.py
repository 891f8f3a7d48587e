"""core.evaluate: base vs adapter on a run's held-out data (accuracy with the dataset's checker, else perplexity)."""

import json

from core.evaluate import evaluate
from tests.helpers.runs import make_run


def test_evaluate_scores_base_and_adapter(garage_home, tiny_model_dir):
    make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    heard = []
    r = evaluate("r1", max_new_tokens=8, limit=3, progress=lambda *a: heard.append(a))
    # batched: progress by batch, from 0 of 3 to 3 of 3, never backwards
    steps = [a[1] for a in heard[1:]]
    assert heard[0][0].startswith("Loading") and steps[0] == 0 and steps[-1] == 3 and steps == sorted(steps)
    assert all(a[2] == 3 for a in heard[1:])
    assert r["metric"] == "accuracy" and r["n"] == 3 and 0 <= r["base"] <= 1 and 0 <= r["adapter"] <= 1
    assert {"prompt", "expected", "base", "adapter", "base_ok", "adapter_ok"} <= set(r["rows"][0])

    rows = [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": f"answer {i}."}]} for i in range(8)]
    data = garage_home / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    make_run(garage_home, tiny_model_dir, "ppl", data={"source": str(data), "val_fraction": 0.25})
    r = evaluate("ppl")
    assert r["metric"] == "perplexity" and r["split"] == "eval" and r["n"] == 2
    assert r["base"] > 1 and r["adapter"] > 1 and r["base"] != r["adapter"]


def test_evaluate_reuses_the_session_and_scores_a_checkpoint(garage_home, tiny_model_dir):
    from core.chat import ChatSession

    make_run(garage_home, tiny_model_dir, checkpoints={3: True}, data={"source": "builtin:demo-identity"})
    session = ChatSession(device="cpu")
    final = evaluate("r1", session=session, max_new_tokens=4, limit=2)
    base = session.base
    step3 = evaluate("latest", checkpoint=3, session=session, max_new_tokens=4, limit=2)
    assert session.base is base  # the base model loaded once for both
    assert session.info()["adapters"] == ["r1", "r1-step3"]
    assert final["base"] == step3["base"] and [r["base"] for r in final["rows"]] == [r["base"] for r in step3["rows"]]


def test_cli_eval_json_and_user_errors(garage_home, tiny_model_dir, capsys):
    from core.__main__ import main

    make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    assert main(["eval", "r1", "--json", "--limit", "2", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"base", "adapter", "n"} <= set(out) and out["n"] == 2
    assert main(["eval", "no-such-run"]) == 2
    assert "error:" in capsys.readouterr().err


