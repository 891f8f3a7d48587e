"""Batches for training, without computing padding where we can avoid it.

    PadCollator    each row padded to the batch's longest (+ attention_mask): works with every model
    FlatCollator   padding-free: the batch's rows laid end to end in as few sequences as fit in the longest row,
                   position_ids restarting at 0 for each, no attention_mask. transformers then keeps the rows apart:
                   flash_attention_2 cuts the sequence at the position_ids restarts (varlen), and for sdpa/eager
                   masking_utils.find_packed_sequence_indices builds a block-diagonal causal mask from them
                   (transformers 5: only when attention_mask is None and there is no KV cache, i.e. training).
    isolation_check  proves that on the real model, at start: a row's logits are the same alone and flattened

Both mask the first label of every row. It is never trained in a padded batch either (nothing comes before it
to predict it from), but left in, it would be predicted from the previous row's last token once rows touch, and
Trainer would count it in num_items_in_batch: masked in both, the two collators give the same loss.
Both count the real (non-padding) tokens they hand out (tokens/s) and the sum of squared row lengths
(attention FLOPs for the MFU).
"""

from __future__ import annotations

import torch

_IGNORE = -100


class PadCollator:
    """Pads each batch to its own longest row (rounded up to multiple_of): input_ids with the pad id, labels with
    -100, attention_mask 0. Rows that are already packed (core.data.tokenize.PackedRows, with position_ids) get
    position_ids and no attention_mask, so their examples do not attend to each other either."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id, self.multiple_of = pad_id, multiple_of
        self.tokens = 0         # real tokens handed out so far
        self.attn_sq = 0        # sum over examples of length**2 (causal attention cost)

    def _count(self, rows: list[dict]) -> None:
        for r in rows:
            self.tokens += len(r["input_ids"])
            for n in _example_lengths(r):
                self.attn_sq += n * n

    def __call__(self, rows: list[dict]) -> dict:
        self._count(rows)
        lengths = [len(r["input_ids"]) for r in rows]
        n = _round_up(max(lengths), self.multiple_of)
        packed = "position_ids" in rows[0]
        input_ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), _IGNORE, dtype=torch.long)
        extra = torch.zeros((len(rows), n), dtype=torch.long)  # attention_mask, or position_ids when packed
        for i, (row, length) in enumerate(zip(rows, lengths)):
            input_ids[i, :length] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, :length] = torch.tensor(row["labels"], dtype=torch.long)
            labels[i, 0] = _IGNORE
            if packed:
                extra[i, :length] = torch.tensor(row["position_ids"], dtype=torch.long)
            else:
                extra[i, :length] = 1
        return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


class FlatCollator(PadCollator):
    """Padding-free batches. The rows are placed first-fit-decreasing into sequences of `capacity` tokens
    (None: the batch's longest row), so attention never costs more than in the padded batch (with sdpa/eager the
    block-diagonal mask is still computed in full, so one long sequence would cost (sum of lengths)^2); with
    capacity=0 everything goes into one sequence, for flash_attention_2, whose varlen kernel skips the blocks.
    Already-packed rows keep their own position_ids."""

    def __init__(self, pad_id: int, multiple_of: int = 1, capacity: int | None = None):
        super().__init__(pad_id, multiple_of)
        self.capacity = capacity

    def __call__(self, rows: list[dict]) -> dict:
        self._count(rows)
        lengths = [len(r["input_ids"]) for r in rows]
        cap = sum(lengths) if self.capacity == 0 else max(self.capacity or 0, max(lengths))
        bins: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
            j = next((j for j, free in enumerate(room) if free >= lengths[i]), None)
            if j is None:
                bins.append([])
                room.append(cap)
                j = len(bins) - 1
            bins[j].append(i)
            room[j] -= lengths[i]
        n = _round_up(max(cap - free for free in room), self.multiple_of)
        input_ids = torch.full((len(bins), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(bins), n), _IGNORE, dtype=torch.long)
        # padding gets position 0 each: every pad token is a sequence of its own, attending only to itself
        position_ids = torch.zeros((len(bins), n), dtype=torch.long)
        for b, members in enumerate(bins):
            at = 0
            for i in members:
                row, length = rows[i], lengths[i]
                input_ids[b, at:at + length] = torch.tensor(row["input_ids"], dtype=torch.long)
                labels[b, at:at + length] = torch.tensor(row["labels"], dtype=torch.long)
                labels[b, at] = _IGNORE
                pos = row.get("position_ids")
                position_ids[b, at:at + length] = (torch.tensor(pos, dtype=torch.long) if pos is not None
                                                   else torch.arange(length))
                at += length
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def isolation_check(model, vocab_size: int, lengths=(7, 5), tol: float = 0.1) -> tuple[bool, str]:
    """Do flattened rows stay apart in this model with its attention kernel? Runs two short random rows alone,
    flattened with restarting position_ids (what FlatCollator sends), and flattened with plain 0..n-1 positions
    (leaking on purpose). Isolated when the flattened logits match the solo ones far better than the leaking
    ones do: a relative test, so it holds in bf16 as in fp32. Three forwards of a dozen tokens."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, max(4, vocab_size), (n,), generator=g) for n in lengths]
    device = next(p.device for p in model.parameters())
    ids = torch.cat(rows)[None].to(device)
    restart = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            solo = model(input_ids=rows[1][None].to(device), use_cache=False).logits.float()
            flat = model(input_ids=ids, position_ids=restart, use_cache=False).logits.float()[:, lengths[0]:]
            leak = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device)[None],
                         use_cache=False).logits.float()
            leak = leak[:, lengths[0]:]
    finally:
        model.train(was_training)
    err = (flat - solo).abs().max().item()
    leak_err = (leak - solo).abs().max().item()
    ok = err <= tol * leak_err or err <= 1e-5
    return ok, f"flattened vs alone: max logit difference {err:.2e} (a leaking mask gives {leak_err:.2e})"


def _example_lengths(row: dict) -> list[int]:
    pos = row.get("position_ids")
    if pos is None:
        return [len(row["input_ids"])]
    out, run = [], 0
    for k, p in enumerate(pos):
        if k and p == 0:
            out.append(run)
            run = 0
        run += 1
    return out + [run]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
