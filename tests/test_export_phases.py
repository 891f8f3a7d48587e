"""The export says where it is with k of n: each parity prompt on each GGUF file (the 149 s wait of issue 24 was
one spinner)."""

import torch

from core.gguf import parity


class _Runtime:
    name = "stand-in"

    def prompt_ids(self, messages):
        return [1, 2]

    def logits(self, ids):
        return torch.zeros(len(ids), 4)

    def generate(self, ids):
        return "hi", True


def test_the_parity_check_counts_its_prompts():
    prompts = [{"messages": [{"role": "user", "content": f"q{i}"}], "expected": None, "ids": [1, 2],
                "reply_ids": [3], "reply": "hi", "stopped": True, "logits": torch.zeros(1, 4)} for i in range(3)]
    said = []
    row = parity._compare(_Runtime(), "q8_0", parity.Reference(prompts, "", ""), said.append)
    assert row["prompts"] == 3
    assert [s for s in said if " of " in s] == [f"parity q8_0: prompt {k} of 3 on stand-in" for k in (1, 2, 3)]
