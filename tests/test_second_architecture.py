"""A user's own base model of another family, without a chat template: a tiny GPT-NeoX through data -> train
(LoRA and QLoRA, real child processes) -> chat -> eval -> export. The fallback template is announced, saved with
the adapter and every checkpoint, and replies stop at its end marker although the vocabulary has no token for it."""

import io
import json
from contextlib import redirect_stdout

import pytest

from core import events as ev
from core.runs import folder as runs
from tests.helpers.training import Launch, losses, tiny_config, write_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    from tests.helpers.tiny_neox import build_tiny_neox

    return build_tiny_neox(tmp_path_factory.mktemp("tiny-neox"))


@pytest.fixture(scope="module")
def neox_runs(tmp_path_factory, neox):
    """LoRA (20 steps) and QLoRA (6 steps) on the tiny NeoX, started together."""
    root = tmp_path_factory.mktemp("neox-runs")
    data = write_dataset(root / "identity.jsonl")
    lora = tiny_config(neox, data, max_steps=20, save_steps=10)
    lora.lora.dropout = 0.0
    qlora = tiny_config(neox, data, max_steps=6, save_steps=3, grad_checkpointing=True)
    qlora.quant.method = "qlora"
    launched = {"lora": Launch(root / "home-lora", lora, {"LORA_GARAGE_TEST_PROBE": "1"}),
                "qlora": Launch(root / "home-qlora", qlora)}
    yield launched
    from core.runs import runner

    for run in launched.values():
        with run.environ():
            if runs.read_status(run.run_dir)["state"] in runs.ACTIVE:
                runner.stop(run.run_id, grace_s=5)


def test_data_renders_with_the_fallback_and_trains_the_end_marker(neox, tmp_path):
    from core import models
    from core.data import sft as data
    from core.data import tokenize as data_tokenize
    from core.config import RunConfig

    cfg = RunConfig()
    cfg.model.source, cfg.data.source = str(neox), str(write_dataset(tmp_path / "d.jsonl", n=4))
    tok = models.load_tokenizer(neox)
    prepared = data.prepare(cfg, tok)
    assert prepared.stats.template_is_default
    assert data_tokenize.stop_strings(tok) == ["<|im_end|>"]
    assert "no <|im_end|> token" in data_tokenize.fallback_notice(tok)
    row = prepared.train[0]
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>user\n") and not text.startswith("<|endoftext|>")  # NeoX adds no BOS
    trained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained.startswith("My name is Garage.") and trained.endswith("<|im_end|><|endoftext|>")


def test_a_tokenizer_that_starts_texts_with_bos_gets_it_from_the_fallback(neox, tmp_path):
    from tokenizers import processors
    from transformers import AutoTokenizer

    from core.data import tokenize as data_tokenize

    tok = AutoTokenizer.from_pretrained(str(neox))
    tok.add_special_tokens({"bos_token": "<|begin|>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # this tokenizer puts BOS before every text
    template, is_default = data_tokenize.chat_template(tok)
    assert is_default and template.startswith("{{ bos_token }}")
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False)
    assert rendered.startswith("<|begin|><|im_start|>user\nhi<|im_end|>")


def test_lora_and_qlora_train_and_save_the_template_with_every_adapter(neox_runs, neox):
    from transformers import AutoTokenizer

    from core import models
    from core.data import tokenize as data_tokenize

    base_tok = models.load_tokenizer(neox)
    fallback = data_tokenize.chat_template(base_tok)[0]
    for name, run in neox_runs.items():
        st = run.wait()
        assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
        log = (run.run_dir / "train.log").read_text()
        assert "gradients flow: all" in log and "template: this model has no chat template" in log, name
        events, _ = ev.read(run.run_dir)
        assert "no <|im_end|> token" in ev.template_notice(events)
        folders = [run.run_dir / "adapter"] + runs.checkpoints(run.run_dir)
        assert len(folders) == 3
        for folder in folders:  # the template travels with the adapter and with every checkpoint
            assert models.saved_chat_template(folder) == fallback, folder
        tok = AutoTokenizer.from_pretrained(str(run.run_dir / "adapter"))
        msgs = [{"role": "user", "content": "Who are you?"}]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
            "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
    curve = losses(neox_runs["lora"].run_dir)
    assert curve[20] < 0.5 * curve[1], curve  # an easy dataset on a plain LoRA: the loss must fall a lot


def test_chat_eval_and_export_on_another_architecture(neox_runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import chat, export
    from core.evaluate import evaluate
    from core.__main__ import main

    run = neox_runs["lora"]
    assert run.wait()["state"] == "completed"
    with run.environ():
        session = chat.ChatSession(device="cpu")
        name = session.load_run(run.run_id)
        assert "no chat template of its own" in session.template_notice
        settings = chat.GenSettings(max_new_tokens=48, temperature=0.0)
        reply = list(session.stream([{"role": "user", "content": "Who are you?"}], settings, adapter=name))[-1]
        assert "<|im_end|>" not in reply and "im_end" not in reply
        assert reply.startswith("My name is Garage"), reply  # the adapter learned the answer on a NeoX
        assert session.last_stats["new_tokens"][0] < 48  # it stopped at the marker, not at the token limit

        scores = evaluate(run.run_id, session=session, limit=8)
        assert scores["metric"] == "perplexity" and scores["adapter"] < scores["base"]

        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["runs", "show", run.run_id]) == 0
        assert "template: this model has no chat template" in out.getvalue()

        said = []
        merged = export.merge(run.run_id, tmp_path / "merged", log=said.append)
        assert any("no chat template of its own" in line for line in said)
        tok = AutoTokenizer.from_pretrained(str(merged))
        assert tok.chat_template == AutoTokenizer.from_pretrained(str(run.run_dir / "adapter")).chat_template
        probe = torch.load(run.run_dir / "probe.pt")
        merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        with torch.no_grad():
            logits = merged_model(input_ids=probe["input_ids"]).logits.float()
        assert (logits - probe["logits"]).abs().max().item() < 1e-3
        assert json.loads((merged / export.EXPORT_INFO).read_text())["run"] == run.run_id


def test_a_reply_is_cut_at_an_end_marker_written_as_plain_text(neox):
    from core import chat, models

    tok = models.load_tokenizer(neox)
    ids = tok("My name is Garage.<|im_end|><|im_start|>user", add_special_tokens=False)["input_ids"]
    streamer = chat._RowsStreamer(tok, 1, {tok.eos_token_id}, ["<|im_end|>"])
    import torch

    streamer.put(torch.tensor([[1, 2]]))  # the prompt comes first and is skipped
    for t in ids:
        streamer.put(torch.tensor([t]))
    streamer.end()
    assert streamer.texts == ["My name is Garage."] and streamer.done == [True]
