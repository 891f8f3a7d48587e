import pytest
"""Metrics events of a real run: tokens/s is counted for the batches each step trained, epoch boundaries included."""

from core import events as ev
from core.runs import runner
from core.runs import folder as runs
from tests.helpers.training import tiny_config, wait_until_done, write_dataset

pytestmark = pytest.mark.integration


def test_every_metrics_event_has_tokens_per_s_across_epoch_boundaries(tiny_model_dir, tmp_path, monkeypatch):
    # the loader collates one batch ahead of the one trained; at an epoch's last step there is none ahead, which
    # is where counting at collation time showed 0 tokens/s (and the next epoch's first step twice its share)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl", n=8), max_steps=-1, epochs=2,
                      batch_size=2, grad_accum=1, save_steps=1000, logging_steps=1, eval_steps=3)
    cfg.data.val_source = str(write_dataset(tmp_path / "val.jsonl", n=4))  # eval batches share the collator
    run_dir = runs.get(runner.start(cfg))
    st = wait_until_done(run_dir)
    assert st["state"] == "completed", runs.tail_log(run_dir, 40)
    events = ev.read(run_dir)[0]
    assert [e["step"] for e in events if e["type"] == "eval"][:2] == [3, 6], events
    metrics = ev.metrics(events)
    assert [m["step"] for m in metrics] == list(range(1, 9)), metrics   # 8 rows / batch 2 = 4 steps, 2 epochs
    assert {round(m["epoch"], 4) for m in metrics} >= {1.0, 2.0}          # both epoch-end steps are among them
    assert all(m["tokens_per_s"] > 0 for m in metrics), [(m["step"], m["tokens_per_s"]) for m in metrics]
