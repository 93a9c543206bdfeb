"""Likelihood of real text under an AR model or a converted dLM."""

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL (nats per token) of tokens 1..n when position i's logits predict token i+1.

    Only pairs where both positions are real tokens are scored, so left padding is excluded.
    """
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return (nll * scored).sum(-1) / scored.sum(-1).clamp(min=1)


@torch.no_grad()
def causal_token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`next_token_nll` of a model's own logits: a transformers `*ForCausalLM`, or an Efficient-DLM model with
    `shift_logits=True` (at `block_size=1` the two are the same computation)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return next_token_nll(logits, input_ids, attention_mask)
