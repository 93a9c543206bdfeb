"""Timing of `generate` for AR parents and diffusion models alike (used by the CLI, the demo and benchmarks)."""

import time
from dataclasses import dataclass

import torch


@dataclass
class GenerationRun:
    sequences: torch.Tensor
    completions: list  # per row: the generated token ids up to and including the first EOS
    seconds: float
    nfe: int | None  # forward passes (None for an AR generate: one per token)
    tokens_per_forward: float | None

    @property
    def new_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds


def completion_tokens(sequences: torch.Tensor, prompt_width: int, eos_token_ids) -> list:
    """Each row's generated ids, cut after its first EOS (the padding that follows is not generated text)."""
    eos = set(eos_token_ids if isinstance(eos_token_ids, (list, tuple)) else [eos_token_ids]) - {None}
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:end])
    return rows


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_generate(model, input_ids, attention_mask=None, **generate_kwargs) -> GenerationRun:
    """One `generate` call, timed wall-clock with the device synchronised on both ends."""
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    is_diffusion = hasattr(model.config, "mask_token_id") and model.config.model_type == "efficient_dlm"
    if is_diffusion:
        generate_kwargs["return_dict_in_generate"] = True
    _synchronize(input_ids.device)
    started = time.perf_counter()
    output = model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)
    _synchronize(input_ids.device)
    seconds = time.perf_counter() - started
    sequences = output.sequences if is_diffusion else output
    completions = completion_tokens(sequences, input_ids.shape[1], eos)
    nfe = output.nfe if is_diffusion else None
    tpf = output.tokens_per_forward if is_diffusion else None
    return GenerationRun(sequences, completions, seconds, nfe, tpf)


def timed_generate_each(model, prompts, **generate_kwargs) -> GenerationRun:
    """`timed_generate` on each `(input_ids, attention_mask)` prompt alone (the latency regime of a chat), totalled:
    completions in order, seconds and forwards summed, tokens per forward over all of them."""
    runs = [timed_generate(model, input_ids, attention_mask, **generate_kwargs) for input_ids, attention_mask in prompts]
    completions = [completion for run in runs for completion in run.completions]
    if runs[0].nfe is None:
        return GenerationRun(None, completions, sum(r.seconds for r in runs), None, None)
    nfe = sum(run.nfe for run in runs)
    return GenerationRun(None, completions, sum(r.seconds for r in runs), nfe,
                         sum(len(c) for c in completions) / max(nfe, 1))
