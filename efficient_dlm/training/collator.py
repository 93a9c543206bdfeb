"""Batching of token rows. The collator only pads and aligns: the noise is drawn later, on the device, by the
trainer (`DlmConversionTrainer.compute_loss`), so that it is fresh every step and never crosses the host link."""

from dataclasses import dataclass

import torch


@dataclass
class DiffusionDataCollator:
    """Right-pads rows to a common width rounded up to a multiple of `block_size`.

    Each feature holds `input_ids`, optionally `labels` (-100 = never masked, e.g. prompt tokens; default: every
    token is a target) and `block_offset`. The batch holds `input_ids`, `attention_mask`, `labels` (-100 on padding,
    and on position 0 with `shift_logits`, where no logit precedes the token) and `block_offset` ([batch]).
    `labels` marks the maskable tokens; the Trainer counts them (`num_items_in_batch`) to normalise the loss.
    """

    pad_token_id: int
    block_size: int
    shift_logits: bool = False

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("cannot collate an empty list of rows")
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        width = max(len(r) for r in rows)
        width += -width % self.block_size
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (feature, row) in enumerate(zip(features, rows)):
            n = len(row)
            input_ids[i, :n] = row
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(feature["labels"], dtype=torch.long) if "labels" in feature else row
        if self.shift_logits:
            labels[:, 0] = -100
        block_offset = torch.tensor([int(f.get("block_offset", 0)) for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "block_offset": block_offset}


__all__ = ["DiffusionDataCollator"]
