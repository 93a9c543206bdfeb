"""RL fine-tuning of block-diffusion models: TRL's GRPO with diffusion rollouts and a sequence likelihood estimate.

    from efficient_dlm.training import DiffusionGRPOConfig, DiffusionGRPOTrainer
    from efficient_dlm.training.tasks import get_task

    task = get_task("addition")
    config = DiffusionGRPOConfig(output_dir="rl", num_generations=8, max_completion_length=32, block_size=8)
    trainer = DiffusionGRPOTrainer(model, reward_funcs=task.reward, args=config,
                                   train_dataset=task.make_dataset(1024), processing_class=tokenizer)
    trainer.train()

What changes against `trl.GRPOTrainer` (everything else — advantages, clipping, loss types, KL to a reference,
LoRA via `peft_config`, logging, `accelerate launch` — is TRL's):

- Rollouts come from the model's own block-diffusion `generate()` (block size, threshold tau, temperature from the
  config), cut after the first EOS. Their tokens per forward are logged (`diffusion/tokens_per_forward`).
- The policy's log pi(completion | prompt) (`sequence_log_likelihood`), one of:
  * `trace` (default; the likelihood of the decoding that produced the rollout, as TraceRL scores it): each token's
    log-probability in the decoder state it was committed from — the prompt, the clean earlier blocks, and its
    block with the positions unmasked before that step (the EOS block's tail included, as the decoder saw it).
    Rollouts record their decoding order (`decoding_trace` of `generate(output_history=True)`), which travels with
    each row through TRL's shuffle and split; copy s of the batch shows every block as it stood before its step s,
    so all steps of all blocks take one forward of (most steps in a block) copies. This is exact: the sampled
    tokens' log-probabilities under the policy that sampled them, given the commit order; token-level ratios are
    then meaningful too (`importance_sampling_level="token"` is allowed).
  * `elbo` (GDPO-style): the block-diffusion ELBO, integrated over the noise level t by Gauss-Legendre
    quadrature (2 nodes by default) with one mask draw per node, all blocks scored by one forward over the `bd3`
    layout [x_t ; x_0] — the layout of the conversion objective. Each completion token is masked independently
    with probability t and weighted 1/t, so at block size 1 the estimate is unbiased for the exact sequence
    log-likelihood. Paired nodes mirror their uniforms (u and 1 - u: with 2 nodes every token is masked at exactly
    one of them), which keeps each node's distribution and halves the variance (`antithetic_masks`). The mask draws
    come from a seed stored with each rollout, so the old and the new policy of an update are scored on the same
    masks wherever the row lands after TRL shuffles and splits the batch.
  * `d1` (one-step, from d1/diffu-GRPO): every completion token masked at once, each block given the clean blocks
    before it; one forward, deterministic, biased (it scores the first denoising step only). For comparison.
  Why `trace` is the default: on the converted SmolLM2-135M (3-digit addition, block 8, tau 0.9; H100, 160 steps,
  experiments/results/rl_smollm2.json) it raised held-out accuracy 0.578 -> 0.684 (a second seed 0.645 -> 0.680),
  as plain GRPO does on the same weights at block size 1, while at the same budget `elbo` lowered it to 0.344
  (second seed 0.523) and `d1` left it at 0.562: their bounds score contexts the confidence-ordered decoder that
  samples the rollouts never visits.
  With the token shift (`config.shift_logits`, logit i scores token i + 1), a block's first token is scored, as
  `generate()` predicts it, from the last position of the *clean* previous block (one more unmasked copy in the
  forward, only when a completion spans more than one block), not from that block's noisy copy as the conversion
  objective reads it: the noisy copy scores it from a context decoding never sees (at d1, a fully masked block).
  So at block size 1 d1 and trace score the exact autoregressive likelihood (elbo is unbiased for it), as without
  the shift.
  The estimate fills TRL's per-token slot as per-position contributions whose sum over a completion is the
  estimate, and `importance_sampling_level="sequence"` turns them into one ratio per completion:
  exp((L_new - L_old) / |completion|), GSPO's length-normalised sequence ratio.
- TRL's fused LM head (a next-token log-prob kernel that shifts labels by one) is removed from the model again
  after TRL installs it; our forward predicts masked tokens in place.
"""

import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from ..evaluation.throughput import completion_tokens
from .masking import draw_independent_masks, num_grid_blocks, seeded_uniforms
from .objective import lay_out_noised_batch, masked_token_log_likelihoods

LIKELIHOOD_ESTIMATORS = ("elbo", "d1", "trace")
# The TRL releases whose private methods this trainer overrides (tests/test_grpo.py checks their signatures).
SUPPORTED_TRL = ">=1.16,<1.17"


def quadrature_nodes(count: int) -> tuple[list[float], list[float]]:
    """Gauss-Legendre nodes and weights on [0, 1] (the weights sum to 1)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"quadrature_nodes must be an integer >= 1, got {count!r}")
    nodes, weights = np.polynomial.legendre.leggauss(count)
    return [float((x + 1) / 2) for x in nodes], [float(w / 2) for w in weights]


def sequence_log_likelihood(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    *,
    mask_token_id: int,
    block_size: int,
    estimator: str = "elbo",
    num_nodes: int = 2,
    mask_seeds: torch.Tensor | list[int] | None = None,
    antithetic: bool = True,
    trace_tokens: torch.Tensor | None = None,
    trace_steps: torch.Tensor | None = None,
    temperature: float = 1.0,
    shift_logits: bool = False,
    compute_entropy: bool = False,
):
    """Estimate log p(completion | prompt) for each row of a TRL batch, as per-position contributions.

    Args:
        input_ids: `[rows, P + C]`, the left-padded prompts then the right-padded completions (TRL's layout).
        attention_mask: `[rows, P + C]`, 0 on padding.
        completion_length: C, the completion columns at the end.
        estimator: "elbo" (quadrature ELBO, needs `mask_seeds`), "d1" (one step, every completion token masked) or
            "trace" (each token scored in the state the decoder committed it from, needs `trace_tokens`/`_steps`).
        num_nodes: quadrature nodes over t (elbo).
        mask_seeds: one integer per row; a row's masks depend on its seed only.
        antithetic: odd quadrature nodes mask with the previous node's uniforms mirrored (u -> 1 - u).
        trace_tokens, trace_steps: `[rows, W >= C]` from `decoding_trace` (trace): the decoded blocks' tokens,
            EOS-block tail included, and the denoising step within its block that unmasked each position.
        temperature: logits are divided by it (the distribution the rollouts were sampled from).
        shift_logits: the model's `config.shift_logits` (logit i scores token i + 1).
    Returns:
        float32 `[rows, C]` whose row sums are the estimates (0 on padding); with `compute_entropy`, also the
        predictive entropy at each completion position (averaged over the copies that scored it).
    """
    if estimator not in LIKELIHOOD_ESTIMATORS:
        raise ValueError(f"likelihood_estimator must be one of {LIKELIHOOD_ESTIMATORS}, got {estimator!r}")
    rows, width = input_ids.shape
    prompt_width = width - completion_length
    device = input_ids.device
    completion_mask = attention_mask[:, prompt_width:].bool()
    if estimator == "trace":
        if trace_tokens is None or trace_steps is None or len(trace_tokens) != rows \
                or trace_tokens.shape[1] < completion_length:
            raise ValueError(f"the trace estimator needs the decoding trace of every row ({rows} rows, at least "
                             f"{completion_length} columns), got "
                             f"{None if trace_tokens is None else tuple(trace_tokens.shape)}")
        return _trace_log_likelihood(
            model, input_ids, attention_mask, completion_length, trace_tokens.to(device), trace_steps.to(device),
            mask_token_id=mask_token_id, block_size=block_size, temperature=temperature, shift_logits=shift_logits,
            compute_entropy=compute_entropy,
        )
    maskable = torch.zeros(rows, width, dtype=torch.bool, device=device)
    maskable[:, prompt_width:] = completion_mask
    if estimator == "d1":
        masked, weights = [maskable], [maskable.float()]
    else:
        if mask_seeds is None or len(mask_seeds) != rows:
            raise ValueError(f"the elbo estimator needs one mask seed per row ({rows}), got "
                             f"{None if mask_seeds is None else len(mask_seeds)}")
        noise_levels, node_weights = quadrature_nodes(num_nodes)
        uniforms = seeded_uniforms(mask_seeds, num_nodes, completion_length, device=device)
        masked, weights = [], []
        for node, t in enumerate(noise_levels):
            node_uniforms = uniforms[:, node]
            if antithetic and node % 2:
                # Odd nodes reuse the previous node's numbers mirrored: each node's masks keep their distribution
                # (every token masked independently with probability t), but with 2 nodes every token is masked
                # at exactly one node when t1 + t2 = 1 — half the variance at block size 1.
                node_uniforms = 1.0 - uniforms[:, node - 1]
            node_masked = torch.zeros_like(maskable)
            node_masked[:, prompt_width:] = draw_independent_masks(completion_mask, t, node_uniforms)
            masked.append(node_masked)
            # Quadrature weight times the ELBO's 1/t: unbiased per node for the sum over the completion's tokens.
            weights.append(node_masked.float() * (node_weights[node] / t))
    return _score_noised_copies(model, input_ids, attention_mask, prompt_width, torch.cat(masked), torch.cat(weights),
                                mask_token_id=mask_token_id, block_size=block_size, temperature=temperature,
                                shift_logits=shift_logits, compute_entropy=compute_entropy)


def _trace_log_likelihood(model, input_ids, attention_mask, completion_length, trace_tokens, trace_steps, *,
                          mask_token_id, block_size, temperature, shift_logits, compute_entropy):
    """The exact log-probability of each token given the decoder state it was committed from.

    Copy s of the batch shows, in every block, the positions unmasked before step s of that block and scores the
    tokens committed at step s: all steps of all blocks in one forward, max-steps-per-block copies. The tail of an
    EOS block (positions after EOS, decoded alongside or padded at the end) is attended as the decoder saw it."""
    rows, width = input_ids.shape
    prompt_width = width - completion_length
    device = input_ids.device
    lengths = attention_mask[:, prompt_width:].sum(-1)
    # The decoded region of a row: the blocks its completion touches (completions start on a block boundary).
    decoded = torch.clamp(-(-lengths // block_size) * block_size, max=trace_tokens.shape[1])
    # The trace spans max_new_tokens; the forward needs only the widest decoded region.
    trace_width = max(int(decoded.max()), completion_length)
    trace_tokens, trace_steps = trace_tokens[:, :trace_width], trace_steps[:, :trace_width]
    column = torch.arange(trace_width, device=device)
    real = column[None, :] < lengths[:, None]
    region = column[None, :] < decoded[:, None]
    completion = input_ids[:, prompt_width:]
    if not torch.equal(trace_tokens[:, :completion_length][real[:, :completion_length]],
                       completion[real[:, :completion_length]]):
        raise RuntimeError("the decoding trace does not match the completions being scored (rows out of order?)")
    ids = torch.cat([input_ids[:, :prompt_width], torch.where(region, trace_tokens, mask_token_id)], 1)
    mask = torch.cat([attention_mask[:, :prompt_width], region.to(attention_mask.dtype)], 1)
    steps = torch.where(region, trace_steps, 0)
    copies = int(torch.where(real, steps, 0).max().item()) if real.any() else 1
    step = torch.arange(1, copies + 1, device=device)[:, None, None]  # copy s scores the tokens of step s
    hidden = region & ~((steps > 0) & (steps < step))  # [copies, rows, W]: still masked when step s ran
    scored = real & (steps == step)
    masked = torch.nn.functional.pad(hidden, (prompt_width, 0)).flatten(0, 1)
    weights = torch.nn.functional.pad(scored.float(), (prompt_width, 0)).flatten(0, 1)
    result = _score_noised_copies(model, ids, mask, prompt_width, masked, weights, mask_token_id=mask_token_id,
                                  block_size=block_size, temperature=temperature, shift_logits=shift_logits,
                                  compute_entropy=compute_entropy)
    if compute_entropy:
        return tuple(part[:, :completion_length] for part in result)
    return result[:, :completion_length]


def _score_noised_copies(model, input_ids, attention_mask, prompt_width, masked, weights, *, mask_token_id,
                         block_size, temperature, shift_logits, compute_entropy):
    """Score `copies` noised versions of a batch in one forward over the `bd3` layout.

    `masked`, `weights`: `[copies * rows, width]`, copy-major: which completion positions each copy replaces by the
    mask token, and the weight of each scored token's log-probability (0: not scored in that copy). Returns the
    completion's per-position sums over copies `[rows, C]` (and with `compute_entropy`, the predictive entropy
    averaged over the copies that scored a position)."""
    rows, width = input_ids.shape
    completion_length = width - prompt_width
    device = input_ids.device
    copies = masked.shape[0] // rows
    # With the token shift, the first token of a block after the first is read at decode time from the last position
    # of the *clean* previous block (generate() keeps that logit for the whole block), never from a noisy copy of
    # it. A copy with nothing masked gives those logits: its noisy half sees exactly the clean prefix. Completions
    # start on a block boundary, so it is needed only when they span more than one block.
    clean_copy = shift_logits and completion_length > block_size
    if clean_copy:
        masked = torch.cat([masked, torch.zeros_like(masked[:rows])])
        weights = torch.cat([weights, torch.zeros_like(weights[:rows])])
    forwarded = copies + (1 if clean_copy else 0)
    # Each row's blocks end where its prompt ends, as generate() laid them out (logical positions skip padding).
    block_offset = (-attention_mask[:, :prompt_width].sum(-1)) % block_size
    noised = lay_out_noised_batch(
        input_ids.repeat(forwarded, 1), masked,
        torch.ones(forwarded * rows, num_grid_blocks(width, block_size), device=device),
        mask_token_id=mask_token_id, block_size=block_size, attention_mask=attention_mask.repeat(forwarded, 1),
        block_offset=block_offset.repeat(forwarded), weighting="none", attention="bd3",
    )
    noised = replace(noised, weights=weights)
    # Only the completion's logits (and, with the shift, the prompt's last one, which scores the first token).
    keep = completion_length + (1 if shift_logits else 0)
    logits = model(**noised.model_inputs(), logits_to_keep=keep).logits
    # The policy is the distribution generate() samples from: logits / temperature, the mask token excluded (the
    # decoder never proposes it). A finite floor rather than -inf keeps p * log p at 0 in the entropy.
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    logits[..., mask_token_id] = torch.finfo(logits.dtype).min
    if clean_copy:
        # Logit column j scores completion token j; columns b, 2b, ... (the blocks' first tokens) from the clean copy.
        starts = torch.arange(block_size, completion_length, block_size, device=device)
        logits = logits.view(forwarded, rows, keep, -1)
        copy_logits = logits[:copies].clone()
        copy_logits[:, :, starts] = logits[copies:, :, starts]
        logits = copy_logits.view(copies * rows, keep, -1)
        noised = replace(noised, targets=noised.targets[:copies * rows], masked=noised.masked[:copies * rows],
                         weights=noised.weights[:copies * rows])
    # Scored are the positions with a weight: a trace copy hides more positions than it scores, and a log-softmax
    # over the vocabulary at each hidden one would be thrown away.
    window = replace(noised, targets=noised.targets[:, -keep:], masked=noised.weights[:, -keep:] > 0,
                     weights=noised.weights[:, -keep:])
    scored = masked_token_log_likelihoods(logits, window, shift_logits, compute_entropy=compute_entropy)
    per_position, entropies = scored if compute_entropy else (scored, None)
    per_position = per_position[:, -completion_length:].reshape(copies, rows, completion_length)
    contributions = per_position.sum(0)
    if not compute_entropy:
        return contributions
    counted = (window.weights[:, -completion_length:] > 0).reshape(copies, rows, completion_length).float()
    entropies = entropies[:, -completion_length:].reshape(copies, rows, completion_length)
    entropy = (entropies * counted).sum(0) / counted.sum(0).clamp(min=1.0)
    return contributions, entropy.detach()


def decoding_trace(history, mask_token_id: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order in which `generate(..., output_history=True)` decoded each row: `(tokens, steps)`, `[rows, W]`.

    `history` holds the completion after every denoising step (the mask token where undecoded). `tokens[r, j]` is
    what position j held when it was first unmasked: the completion, and in the tail of its EOS block the tokens the
    decoder committed there before the row ended (it pads them once EOS is final, at the row's last commit, so only
    the first value was ever seen by a real token). `steps[r, j]` is the 1-based index, within its block, of the
    step that unmasked position j (0 where nothing was decoded). Completions start on a block boundary, so blocks
    are columns [k * block_size, (k + 1) * block_size)."""
    states = torch.stack([state.to(history[-1].device) for state in history])  # [steps, rows, W]
    unmasked = states != mask_token_id
    first_index = unmasked.to(torch.uint8).argmax(0)  # the (0-based) step that unmasked each position
    tokens = states.gather(0, first_index[None]).squeeze(0)
    first = torch.where(unmasked.any(0), first_index + 1, 0)
    rows, width = first.shape
    blocks = torch.nn.functional.pad(first, (0, -width % block_size)).view(rows, -1, block_size)
    # A block's first step commits at least one token, so the block's smallest step is the step it started at.
    started = torch.where(blocks > 0, blocks, len(history) + 1).min(-1, keepdim=True).values
    steps = torch.where(blocks > 0, blocks - started + 1, 0).view(rows, -1)[:, :width]
    return tokens, steps


@dataclass
class DiffusionGRPOConfig(GRPOConfig):
    """`trl.GRPOConfig` plus block-diffusion rollouts and the likelihood estimator.

    Defaults that differ from TRL's: `importance_sampling_level="sequence"` (the estimate is a sequence-level
    quantity) and `loss_type="grpo"` (the per-sequence objective GSPO uses).
    """

    block_size: int | None = field(default=None, metadata={"help": "Decode and scoring block (default: the model's "
                                                                   "config.block_size)."})
    threshold: float = field(default=0.9, metadata={"help": "Confidence threshold tau of parallel decoding, (0, 1]."})
    likelihood_estimator: str = field(default="trace", metadata={"help": f"One of {LIKELIHOOD_ESTIMATORS}."})
    quadrature_nodes: int = field(default=2, metadata={"help": "Gauss-Legendre nodes over t (elbo estimator)."})
    antithetic_masks: bool = field(
        default=True, metadata={"help": "Mirror the mask draws of paired nodes (u -> 1 - u): same distribution per "
                                        "node, half the estimator's variance at block size 1 (elbo estimator)."}
    )
    importance_sampling_level: str = field(default="sequence", metadata={"help": "'sequence' (or 'token' with d1)."})
    loss_type: str = field(default="grpo", metadata={"help": "TRL loss type."})

    def __post_init__(self):
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            raise ValueError(f"num_generations must be an integer >= 2 (GRPO compares the completions of one "
                             f"prompt), got {self.num_generations!r}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise ValueError(f"block_size must be an integer >= 1 or None, got {self.block_size!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.likelihood_estimator not in LIKELIHOOD_ESTIMATORS:
            raise ValueError(f"likelihood_estimator must be one of {LIKELIHOOD_ESTIMATORS}, "
                             f"got {self.likelihood_estimator!r}")
        quadrature_nodes(self.quadrature_nodes)
        if self.importance_sampling_level == "token" and self.likelihood_estimator == "elbo":
            raise ValueError("importance_sampling_level must be 'sequence' with likelihood_estimator='elbo': its "
                             "per-position terms are parts of one sequence estimate, not token log-probabilities "
                             "('token' is allowed with 'd1' and 'trace')")
        if self.use_vllm:
            raise ValueError("use_vllm must be False: vLLM cannot decode block-diffusion models; rollouts use the "
                             "model's own generate()")
        if self.use_transformers_continuous_batching or self.use_transformers_paged:
            raise ValueError("use_transformers_continuous_batching must be False: it decodes autoregressively")
        if self.use_liger_kernel:
            raise ValueError("use_liger_kernel must be False: Liger's fused linear cross-entropy scores next tokens, "
                             "and this trainer scores masked tokens in place")
        if self.repetition_penalty != 1.0 or self.min_p is not None:
            raise ValueError("repetition_penalty must be 1.0 and min_p None: diffusion decoding does not apply them "
                             "(use temperature, top_p, top_k)")
        if self.likelihood_estimator == "trace" and ((self.top_k or 0) > 0 or (
                self.top_p is not None and self.top_p < 1.0)):
            raise ValueError("top_k must be 0/None and top_p 1.0 with likelihood_estimator='trace': it scores the "
                             "rollouts' exact log-probabilities at the temperature, and a truncated sampling "
                             "distribution would make them wrong (use temperature alone)")
        if self.top_entropy_quantile != 1.0:
            raise ValueError("top_entropy_quantile must be 1.0: it selects tokens by entropy, and the ratio here is "
                             "per sequence")
        super().__post_init__()


class DiffusionGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` for `EfficientDlmForMaskedDiffusion` models (see the module docstring).

    Takes `GRPOTrainer`'s arguments; `args` must be a `DiffusionGRPOConfig`. Reward functions have TRL's signature
    (`f(prompts, completions, completion_ids, **dataset_columns) -> list[float | None]`); one that returns the
    wrong number of rewards, or NaN/inf, is an error (None still means "not applicable", as in TRL).

    A KL penalty (`beta > 0`) scores the reference policy with the same estimator and masks; with `peft_config` the
    reference is the base with the adapter disabled, otherwise TRL loads it again from the model's folder.
    """

    def __init__(self, model, reward_funcs=None, args: DiffusionGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None):
        if args is None:
            args = DiffusionGRPOConfig(output_dir="diffusion_grpo_output")
        if not isinstance(args, DiffusionGRPOConfig):
            raise TypeError(f"args must be a DiffusionGRPOConfig, got {type(args).__name__}")
        if tools or rollout_func is not None or environment_factory is not None:
            raise ValueError("tools, rollout_func and environment_factory are not supported: rollouts are single "
                             "turns of the model's diffusion generate()")
        if isinstance(model, str):
            from ..modeling_efficient_dlm import EfficientDlmForMaskedDiffusion

            model = EfficientDlmForMaskedDiffusion.from_pretrained(model, **(args.model_init_kwargs or {}))
        config = getattr(model, "config", None)
        if getattr(config, "mask_token_id", None) is None or not hasattr(config, "shift_logits"):
            raise ValueError("model must be an Efficient-DLM diffusion model with a mask_token_id in its config "
                             "(convert the AR model first: efficient_dlm.conversion.convert)")
        self.mask_token_id = int(config.mask_token_id)
        self.shift_logits = bool(config.shift_logits)
        self.block_size = args.block_size or int(config.block_size)
        self.likelihood_estimator = args.likelihood_estimator
        self.num_quadrature_nodes = args.quadrature_nodes
        self.antithetic_masks = bool(args.antithetic_masks)
        reward_funcs = [_checked_reward(f) for f in (reward_funcs if isinstance(reward_funcs, list)
                                                     else [] if reward_funcs is None else [reward_funcs])]
        self._mask_seeds = None  # seeds of the rows being scored (set before every estimator call)
        self._trace = None  # (tokens, steps) of the rows being scored, trace estimator
        # Per process, so that data-parallel ranks do not draw the same masks for their different rollouts.
        self._mask_seed_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + args.process_index)
        super().__init__(model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config)
        for patched in (self.model, self.ref_model):
            _remove_fused_lm_head(patched)

    # -- rollouts --------------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Decode the (already repeated) prompts with the model's diffusion generate(); completions cut after EOS."""
        device = self.accelerator.device
        width = max(len(ids) for ids in prompt_ids)
        pad_id = self._tokenizer.pad_token_id
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids],
                                      device=device)
        sampling = {}
        if self.temperature and self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                        "top_k": self.top_k or None}
        mode = "train" if self.model.training else "eval"
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            output = unwrapped_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_completion_length,
                block_size=self.block_size, threshold=self.args.threshold, eos_token_id=list(self.eos_token_ids),
                pad_token_id=pad_id, return_dict_in_generate=True, output_history=self.likelihood_estimator == "trace",
                **sampling,
            )
        if self.likelihood_estimator == "trace":
            # In rollout order: TRL scores the old and reference policies on these rows before it shuffles them.
            self._trace = decoding_trace(output.history, self.mask_token_id, self.block_size)
        self._metrics[mode]["diffusion/tokens_per_forward"].append(float(output.tokens_per_forward))
        self._metrics[mode]["diffusion/nfe"].append(float(output.nfe))
        return completion_tokens(output.sequences, width, list(self.eos_token_ids)), None

    def _generate_and_score_completions(self, inputs):
        # Every rollout gets a mask seed before TRL scores it (old / reference policy, inside super()); the seed
        # travels with the row through TRL's shuffle and split, and `_compute_loss` scores the new policy with it.
        # With the trace estimator, the rollouts' decoding order travels the same way (set by _generate_single_turn).
        seeds = torch.randint(0, 2**62, (len(inputs),), generator=self._mask_seed_generator)
        self._mask_seeds = seeds
        try:
            output = super()._generate_and_score_completions(inputs)
            device = output["completion_ids"].device
            output["mask_seeds"] = seeds.to(device)
            if self.likelihood_estimator == "trace":
                output["trace_tokens"], output["trace_steps"] = (part.to(device) for part in self._trace)
        finally:
            self._mask_seeds = self._trace = None
        return output

    # -- the likelihood ----------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        self._mask_seeds = inputs["mask_seeds"]
        if self.likelihood_estimator == "trace":
            self._trace = (inputs["trace_tokens"], inputs["trace_steps"])
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._mask_seeds = self._trace = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """The sequence estimate's per-position contributions in TRL's per-token slot (see the module docstring)."""
        if any(value is not None for value in multimodal.values()):
            raise ValueError("multimodal inputs are not supported by the diffusion GRPO trainer")
        if compute_aux_loss:
            raise ValueError("the MoE auxiliary loss is not supported by the diffusion GRPO trainer")
        seeds, trace = self._mask_seeds, self._trace
        if (seeds is None and self.likelihood_estimator == "elbo") or (
                trace is None and self.likelihood_estimator == "trace"):
            raise RuntimeError(f"no mask seeds or decoding trace for the rows being scored: the "
                               f"{self.likelihood_estimator} estimator is called from _generate_and_score_completions "
                               f"or _compute_loss only")
        batch_size = batch_size or input_ids.shape[0]
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.shape[0], batch_size):
            end = start + batch_size
            with self.accelerator.autocast():
                result = sequence_log_likelihood(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep,
                    mask_token_id=self.mask_token_id, block_size=self.block_size,
                    estimator=self.likelihood_estimator, num_nodes=self.num_quadrature_nodes,
                    mask_seeds=None if seeds is None else seeds[start:end], antithetic=self.antithetic_masks,
                    trace_tokens=None if trace is None else trace[0][start:end],
                    trace_steps=None if trace is None else trace[1][start:end],
                    temperature=self.temperature or 1.0,
                    shift_logits=self.shift_logits, compute_entropy=compute_entropy,
                )
            logps, entropies = result if compute_entropy else (result, None)
            all_logps.append(logps)
            all_entropies.append(entropies)
        logps = torch.cat(all_logps)
        return logps, (torch.cat(all_entropies) if compute_entropy else None), None


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of TRL prompts, as `GRPOTrainer` makes them: chat prompts through the chat template with the
    generation prompt, plain text through the tokenizer."""
    if prompts and isinstance(prompts[0], list):
        encoded = tokenizer.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return [list(ids) for ids in encoded["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


@torch.no_grad()
def evaluate_on_task(model, tokenizer, task, rows, *, max_new_tokens: int, block_size: int | None = None,
                     threshold: float = 0.9, batch_size: int = 64, temperature: float = 0.0,
                     seed: int = 0) -> dict:
    """Diffusion decoding of task rows (`task.make_rows`): accuracy, mean reward, tokens per forward.

    Greedy by default; `temperature > 0` samples (as the RL rollouts do), from a generator seeded with `seed`."""
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    completions, forwards, tokens = [], 0.0, 0
    sampling = {}
    if temperature and temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature,
                    "generator": torch.Generator(device=device).manual_seed(seed)}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in chunk])
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
        attention_mask = (torch.arange(width, device=device)[None, :]
                          >= torch.tensor([width - len(ids) for ids in prompt_ids], device=device)[:, None]).long()
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                block_size=block_size, threshold=threshold, eos_token_id=eos, pad_token_id=pad,
                                return_dict_in_generate=True, **sampling)
        generated = completion_tokens(output.sequences, width, eos)
        tokens += sum(len(row) for row in generated)
        forwards += sum(len(row) for row in generated) / output.tokens_per_forward
        completions += tokenizer.batch_decode(generated, skip_special_tokens=True)
    model.train(model_was_training)
    problems = [row["problem"] for row in rows]
    rewards = task.reward(completions=completions, problem=problems)
    return {"accuracy": task.accuracy(completions, problems), "mean_reward": sum(rewards) / len(rewards),
            "tokens_per_forward": tokens / forwards if forwards else 0.0, "examples": completions[:4]}


def _remove_fused_lm_head(model) -> None:
    """Undo `trl.trainer.utils.add_fused_lm_head`: it replaces the instance's `forward` with a next-token kernel."""
    if model is None:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "forward" in vars(base):
        del base.forward


def _checked_reward(reward_func):
    """A reward callable that fails loudly on a wrong count or a NaN/inf reward, keeping the name TRL logs it by."""
    if not callable(reward_func) or isinstance(reward_func, torch.nn.Module) or isinstance(reward_func, str):
        return reward_func

    name = getattr(reward_func, "__name__", type(reward_func).__name__)

    def check(rewards, completions):
        if not hasattr(rewards, "__len__") or len(rewards) != len(completions):
            count = len(rewards) if hasattr(rewards, "__len__") else type(rewards).__name__
            raise ValueError(f"reward function {name!r} returned {count} rewards for {len(completions)} "
                             f"completions: it must return one float (or None) per completion")
        for index, value in enumerate(rewards):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise ValueError(f"reward function {name!r} returned {value!r} for completion {index}: rewards "
                                 f"must be finite floats (or None for 'not applicable')")
        return rewards

    if inspect.iscoroutinefunction(reward_func) or inspect.iscoroutinefunction(
            getattr(reward_func, "__call__", None)):
        async def checked(*args, completions=None, **kwargs):
            return check(list(await reward_func(*args, completions=completions, **kwargs)), completions)
    else:
        def checked(*args, completions=None, **kwargs):
            rewards = reward_func(*args, completions=completions, **kwargs)
            return check(_as_list(rewards), completions)
    functools.update_wrapper(checked, reward_func, assigned=("__module__", "__qualname__", "__doc__"), updated=())
    checked.__name__ = name
    return checked


def _as_list(rewards):
    if isinstance(rewards, torch.Tensor):
        return rewards.tolist()
    if isinstance(rewards, np.ndarray):
        return rewards.tolist()
    return rewards


__all__ = [
    "LIKELIHOOD_ESTIMATORS",
    "SUPPORTED_TRL",
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "decoding_trace",
    "encode_prompts",
    "evaluate_on_task",
    "quadrature_nodes",
    "sequence_log_likelihood",
]
