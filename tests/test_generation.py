"""generate(): AR equivalence, cache exactness, batch invariance, commit rules, EOS/stops/streamers, bad input."""

import pytest
import torch
from conftest import left_padded_batch, tiny_ar_model, tiny_tokenizer
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextStreamer, pipeline

from efficient_dlm import EfficientDlmGenerationConfig
from efficient_dlm.conversion import convert, dlm_from_ar_model
from efficient_dlm.generation_efficient_dlm import active_sub_block, propose_tokens, select_commits

MASK = 5


def converted(family="qwen3", block_size=4, shift_logits=False, seed=0):
    ar = tiny_ar_model(family, seed=seed)
    return dlm_from_ar_model(ar, block_size=block_size, shift_logits=shift_logits, mask_token_id=MASK)


# ---------------------------------------------------------------------------------------------------------------------
# Equivalences
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_block_one_with_shift_is_the_ar_parents_greedy_generate(family):
    ar = tiny_ar_model(family, seed=3)
    dlm = dlm_from_ar_model(ar, block_size=1, shift_logits=True, mask_token_id=MASK)
    ids, mask = left_padded_batch([9, 4, 6], seed=1)
    # The mask token is never a prediction of the dLM; a random parent would sometimes pick it, a real one does not
    # (it is an unused special token), so the parent decodes with it suppressed.
    expected = ar.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                           suppress_tokens=[MASK])
    got = dlm.generate(ids, attention_mask=mask, max_new_tokens=16, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected[:, : got.sequences.shape[1]])
    assert (expected[:, got.sequences.shape[1]:] == 0).all()
    assert got.nfe == 16 and got.tokens_per_forward <= 1.0


def test_real_smollm2_block_one_generate_matches_the_parent_on_a_chat_prompt(smollm2_parent):
    ar, tokenizer = smollm2_parent
    dlm = dlm_from_ar_model(ar, block_size=1, shift_logits=True, mask_token_id=16)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = ar.generate(**prompt, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)
    got = dlm.generate(**prompt, max_new_tokens=24, eos_token_id=2, pad_token_id=2)
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0, prompt["input_ids"].shape[1]:])


@pytest.mark.parametrize("shift_logits", [False, True])
@pytest.mark.parametrize("options", [{"threshold": 0.02}, {"threshold": 0.9}, {"steps": 3, "sub_block_size": 2}],
                         ids=["tau0.02", "tau0.9", "steps3-sub2"])
def test_cached_decoding_equals_recomputing_the_prefix(shift_logits, options):
    dlm = converted(block_size=4, shift_logits=shift_logits)
    ids, mask = left_padded_batch([7, 3, 10], seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=14, return_dict_in_generate=True, eos_token_id=None, **options)
    cached = dlm.generate(ids, **kwargs)
    recomputed = dlm.generate(ids, use_cache=False, **kwargs)
    static = dlm.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences) and torch.equal(cached.sequences, static.sequences)
    assert cached.nfe == recomputed.nfe == static.nfe


@pytest.mark.parametrize("shift_logits", [False, True])
def test_static_cache_path_keeps_finished_rows_and_gives_the_same_tokens(shift_logits):
    dlm = converted(block_size=4, shift_logits=shift_logits)
    ids, mask = left_padded_batch([5, 9, 2], seed=3)
    free = dlm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, threshold=0.3)
    eos = next(t for t in free[0, 9:13].tolist() if t not in free[1, 9:].tolist())
    kwargs = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=eos, threshold=0.3,
                  return_dict_in_generate=True)
    dynamic = dlm.generate(ids, **kwargs)
    static = dlm.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic.sequences, static.sequences) and dynamic.nfe == static.nfe


# The fast static path on the CPU: what the compiled layer and the kernels compute inside the CUDA graph on a GPU
# (tests/test_gpu.py and benchmarks/validate_static_gpu.py check the graphs themselves).
STATIC_CASES = [([9], 16), ([9, 5, 12], 16)]  # single, and batched with ragged left padding


def static_vs_eager(dlm, cases=STATIC_CASES, **static_options):
    for lengths, new in cases:
        ids, mask = left_padded_batch(lengths, seed=len(lengths))
        kwargs = dict(attention_mask=mask, max_new_tokens=new, threshold=0.05, eos_token_id=[],
                      return_dict_in_generate=True)
        eager = dlm.generate(ids, cache_implementation="dynamic", **kwargs)
        fast = dlm.generate(ids, cache_implementation="static", **static_options, **kwargs)
        assert torch.equal(eager.sequences, fast.sequences), (lengths, static_options)
        assert eager.decode_path == "dynamic" and fast.decode_path.startswith("static")
        assert ("+compile" in fast.decode_path) == static_options.get("compile", False)
        assert eager.nfe == fast.nfe > new // 4  # several steps per block: the repeating step shapes ran


@pytest.mark.parametrize("shift_logits", [False, True])
def test_compiled_static_path_gives_the_eager_tokens_and_compiles_once_per_step_shape(shift_logits):
    """fp32, torch.compile'd decoder layers (inductor on the CPU): same tokens as the eager reference, single and
    batched; one compiled layer serves every layer (two graphs per batch shape: the plain step and the first step
    of a block), and a repeated call compiles nothing."""
    from torch._dynamo.utils import counters

    dlm = converted(block_size=4, shift_logits=shift_logits)
    torch._dynamo.reset()
    counters.clear()
    static_vs_eager(dlm, compile=True, kernels="none")
    assert counters["stats"]["unique_graphs"] == 2 * len(STATIC_CASES)
    static_vs_eager(dlm, compile=True, kernels="none")
    assert counters["stats"]["unique_graphs"] == 2 * len(STATIC_CASES)


# Every tensor a captured step reads or writes besides the model's weights and the graph's own buffers: each must be
# the kept one, not one made per call (a replayed graph would read a freed address).
STEP_TENSORS = ("slots", "slot_positions", "slot_blocks", "slot_is_real", "committed", "no_noise", "eos_ids",
                "prev_logits")


def test_static_state_is_kept_per_shape_and_refilled_per_call(monkeypatch):
    """A second call with the same shapes reuses the kept buffers (the very tensors a captured graph reads) and still
    gives the eager tokens for a different prompt; another shape gets its own state; clearing frees them."""
    from efficient_dlm import generation_efficient_dlm as G
    from efficient_dlm.generation_efficient_dlm import _STATIC_STATES

    decoders = []
    run = G._StaticBlockDecoder.run
    monkeypatch.setattr(G._StaticBlockDecoder, "run", lambda self, **kw: decoders.append(self) or run(self, **kw))
    dlm = converted(block_size=4, shift_logits=True)
    static_vs_eager(dlm, cases=[([9, 5, 12], 12)])
    (state,) = _STATIC_STATES[dlm].values()
    keys = state.cache.keys
    ids, mask = left_padded_batch([3, 12, 7], seed=11)  # same width, other prompts and padding
    kwargs = dict(attention_mask=mask, max_new_tokens=12, threshold=0.05, eos_token_id=[])
    assert torch.equal(dlm.generate(ids, cache_implementation="static", **kwargs),
                       dlm.generate(ids, cache_implementation="dynamic", **kwargs))
    assert len(_STATIC_STATES[dlm]) == 1 and next(iter(_STATIC_STATES[dlm].values())).cache.keys is keys
    first, second = decoders
    assert second.cache is first.cache and second.state is first.state
    for name in STEP_TENSORS:
        assert getattr(first, name) is not None and getattr(second, name) is getattr(first, name), name
    for name in ("keys", "values", "write_index", "pad_len"):
        assert getattr(second.cache, name) is getattr(first.cache, name), name
    static_vs_eager(dlm, cases=[([4], 8)])
    assert len(_STATIC_STATES[dlm]) == 2
    dlm.clear_static_decoding_state()
    assert dlm not in _STATIC_STATES


needs_interpreted_triton = pytest.mark.skipif(
    not __import__("efficient_dlm.kernels_efficient_dlm", fromlist=["x"]).triton_interpreting(),
    reason="needs triton with TRITON_INTERPRET=1 (the kernels on the CPU)")


@needs_interpreted_triton
@pytest.mark.parametrize("shift_logits", [False, True])
def test_static_path_with_the_triton_kernels_gives_the_eager_tokens(shift_logits, monkeypatch):
    """Block attention over the cache and the fused confidence/argmax (triton's interpreter on the CPU) in the
    repeating steps: same tokens as the eager reference, and the kernels did run."""
    from efficient_dlm import generation_efficient_dlm as G

    calls = {"attention": 0, "confidence": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(G, "cached_block_attention", counted("attention", G.cached_block_attention))
    monkeypatch.setattr(G, "confidence_argmax", counted("confidence", G.confidence_argmax))
    static_vs_eager(converted(block_size=4, shift_logits=shift_logits), kernels="all")
    assert calls["attention"] > 0 and calls["confidence"] > 0


@pytest.mark.slow
@needs_interpreted_triton
def test_compiled_static_path_with_the_triton_kernels_gives_the_eager_tokens():
    """The block attention kernel as an opaque op inside the compiled layer."""
    torch._dynamo.reset()
    static_vs_eager(converted(block_size=4, shift_logits=True), compile=True, kernels="all")


def test_static_path_without_cuda_falls_back_to_torch_with_one_log_line(caplog, monkeypatch):
    from efficient_dlm import kernels_efficient_dlm as K

    monkeypatch.setattr(K, "_LOGGED_FALLBACKS", set())
    dlm = converted(block_size=4)
    with caplog.at_level("WARNING", logger=K.__name__):
        static_vs_eager(dlm, kernels="auto")
        static_vs_eager(dlm)
    lines = [r.getMessage() for r in caplog.records if r.name == K.__name__]
    # The reason is the first one that applies: no triton at all, else CPU tensors.
    reason = "not CUDA" if K.HAS_TRITON else "triton is not installed"
    assert len(lines) == 1 and reason in lines[0] and "reference path" in lines[0], lines


@pytest.mark.parametrize("shift_logits", [False, True])
def test_batch_rows_equal_single_rows_at_temperature_zero(shift_logits):
    dlm = converted(family="llama", block_size=4, shift_logits=shift_logits, seed=4)
    lengths = [3, 9, 6, 4]  # prompts ending at every offset inside a block of 4
    ids, mask = left_padded_batch(lengths, seed=5)
    batched = dlm.generate(ids, attention_mask=mask, max_new_tokens=10, threshold=0.03, eos_token_id=[7, 9])
    for row, length in enumerate(lengths):
        alone = dlm.generate(ids[row:row + 1, -length:], max_new_tokens=10, threshold=0.03, eos_token_id=[7, 9])
        completion = batched[row, ids.shape[1]:]
        assert torch.equal(completion[: alone.shape[1] - length], alone[0, length:])
        assert (completion[alone.shape[1] - length:] == dlm.config.pad_token_id).all()


def test_threshold_trades_forwards_for_parallel_commits():
    dlm = converted(block_size=8)
    ids, mask = left_padded_batch([6], seed=7)
    one_at_a_time = dlm.generate(ids, max_new_tokens=16, threshold=1.0, eos_token_id=None, return_dict_in_generate=True)
    parallel = dlm.generate(ids, max_new_tokens=16, threshold=0.01, eos_token_id=None, return_dict_in_generate=True)
    fixed = dlm.generate(ids, max_new_tokens=16, steps=4, eos_token_id=None, return_dict_in_generate=True)
    assert one_at_a_time.nfe == 16 and one_at_a_time.tokens_per_forward == 1.0
    assert parallel.nfe < 16 and parallel.tokens_per_forward > 1.0
    assert fixed.nfe == 4 and fixed.tokens_per_forward == 4.0


# ---------------------------------------------------------------------------------------------------------------------
# The commit rule on crafted confidences
# ---------------------------------------------------------------------------------------------------------------------


def test_threshold_rule_commits_every_confident_masked_position_and_the_top_one():
    confidence = torch.tensor([[0.95, 0.2, 0.91, 0.5], [0.3, 0.4, 0.1, 0.35], [0.99, 0.98, 0.97, 0.1]])
    eligible = torch.tensor([[True, True, True, True], [True, True, True, True], [False, True, True, True]])
    commit = select_commits(confidence, eligible, threshold=0.9)
    assert commit.tolist() == [[True, False, True, False],  # all >= 0.9
                               [False, True, False, False],  # none passes: the forced top-1
                               [False, True, True, False]]  # an ineligible (already decoded) position never


def test_factor_rule():
    # sorted c = 0.99, 0.9, 0.8, 0.3: (n+1)(1-c_n) = 0.02, 0.3, 0.8, 3.5
    confidence = torch.tensor([[0.3, 0.9, 0.99, 0.8]])
    eligible = torch.ones_like(confidence, dtype=torch.bool)
    assert select_commits(confidence, eligible, factor=1.0).tolist() == [[False, True, True, True]]
    assert select_commits(confidence, eligible, factor=0.5).tolist() == [[False, True, True, False]]
    assert select_commits(confidence, eligible, factor=0.01).tolist() == [[False, False, True, False]]  # forced


def test_fixed_tokens_per_step_takes_the_most_confident_regardless_of_threshold():
    confidence = torch.tensor([[0.1, 0.5, 0.3, 0.05]])
    eligible = torch.tensor([[True, True, True, False]])
    assert select_commits(confidence, eligible, steps=2).tolist() == [[False, True, True, False]]
    assert select_commits(confidence, eligible, steps=9).tolist() == [[True, True, True, False]]


def test_sub_blocks_open_left_to_right():
    masked = torch.tensor([[False, False, True, True, True, True], [True, True, True, True, True, True]])
    assert active_sub_block(masked, 2).tolist() == [[False, False, True, True, False, False],
                                                    [True, True, False, False, False, False]]
    assert active_sub_block(masked, None).all()


def test_greedy_proposal_and_seeded_sampling():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    tokens, confidence = propose_tokens(logits)
    assert tokens.item() == 0 and confidence.item() == pytest.approx(logits.softmax(-1).max().item())
    tokens, _ = propose_tokens(logits, do_sample=True, temperature=1.0, top_k=1)
    assert tokens.item() == 0  # top_k=1 leaves only the argmax
    draws = {propose_tokens(logits, do_sample=True, temperature=1.0, top_p=0.6)[0].item() for _ in range(50)}
    assert draws == {0}  # token 0 alone has p = 0.64 >= top_p: the nucleus is {0}
    # p = (0.644, 0.237, 0.087, 0.032): the smallest set reaching 0.85 is {0, 1}
    draws = {propose_tokens(logits, do_sample=True, temperature=1.0, top_p=0.85)[0].item() for _ in range(200)}
    assert draws == {0, 1}


# ---------------------------------------------------------------------------------------------------------------------
# Sampling, EOS, stops, streamers, configs, pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_sampling_with_a_seed_is_reproducible_and_temperature_zero_is_greedy():
    dlm = converted(block_size=4)
    ids, mask = left_padded_batch([5, 8], seed=8)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, threshold=0.5)
    torch.manual_seed(11)
    first = dlm.generate(ids, do_sample=True, temperature=1.0, **kwargs)
    torch.manual_seed(11)
    second = dlm.generate(ids, do_sample=True, temperature=1.0, **kwargs)
    torch.manual_seed(12)
    other = dlm.generate(ids, do_sample=True, temperature=1.0, **kwargs)
    assert torch.equal(first, second) and not torch.equal(first, other)
    greedy = dlm.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(dlm.generate(ids, do_sample=True, temperature=0.0, **kwargs), greedy)


@pytest.mark.parametrize("shift_logits", [False, True])
def test_eos_stops_a_row_and_the_rest_is_padding(shift_logits):
    dlm = converted(block_size=4, shift_logits=shift_logits)
    ids, mask = left_padded_batch([6, 6], seed=9)
    free = dlm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, threshold=0.5)
    completion = free[:, ids.shape[1]:]
    eos = int(completion[0, 5])  # a token row 0 really produces, promoted to EOS
    for eos_setting in (eos, [99999 % 128, eos]):
        out = dlm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos_setting, threshold=0.5,
                           return_dict_in_generate=True)
        row = out.sequences[0, ids.shape[1]:]
        first = int((row == eos).nonzero()[0])
        assert first <= 5 and torch.equal(row[: first + 1], completion[0, : first + 1])
        assert (row[first + 1:] == dlm.config.pad_token_id).all()


def test_stop_strings_cut_the_completion():
    tokenizer = tiny_tokenizer()
    dlm = converted(block_size=4)
    ids = tokenizer("w10 w11 w12", return_tensors="pt").input_ids
    free = dlm.generate(ids, max_new_tokens=12, eos_token_id=None, threshold=0.5)
    words = tokenizer.decode(free[0, 3:]).split()
    stop = words[4]
    out = dlm.generate(ids, max_new_tokens=12, eos_token_id=None, threshold=0.5, stop_strings=stop,
                       tokenizer=tokenizer)
    text = tokenizer.decode(out[0, 3:], skip_special_tokens=True)
    assert text.endswith(stop) and text.split() == words[: words.index(stop) + 1]


def test_stopping_criteria_end_a_row_after_its_block():
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3 + 8, dtype=torch.bool)

    dlm = converted(block_size=4)
    ids = torch.tensor([[10, 11, 12]])
    out = dlm.generate(ids, max_new_tokens=20, eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopAfter()]),
                       return_dict_in_generate=True)
    assert out.sequences.shape[1] == 3 + 8


class RecordingStreamer(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.received, self.ended = [], False

    def put(self, value):
        self.received.append(value.clone())
        super().put(value)

    def end(self):
        self.ended = True
        super().end()


@pytest.mark.parametrize("shift_logits", [False, True])
def test_streamer_receives_exactly_the_returned_tokens_in_order(shift_logits, capsys):
    tokenizer = tiny_tokenizer()
    dlm = converted(block_size=4, shift_logits=shift_logits)
    ids = tokenizer("w20 w21 w22 w23 w24", return_tensors="pt").input_ids
    free = dlm.generate(ids, max_new_tokens=12, eos_token_id=None, threshold=0.5)
    eos = int(free[0, 5 + 6])
    streamer = RecordingStreamer(tokenizer)
    out = dlm.generate(ids, max_new_tokens=12, eos_token_id=eos, threshold=0.5, streamer=streamer)
    assert streamer.ended and torch.equal(streamer.received[0].view(-1), ids[0])
    streamed = torch.cat([chunk.view(-1) for chunk in streamer.received[1:]])
    assert torch.equal(streamed, out[0, 5:])
    assert len(streamer.received) - 1 == -(-streamed.numel() // 4)  # one put per committed block


def test_history_and_a_plain_generation_config_with_diffusion_fields():
    dlm = converted(block_size=4)
    ids = torch.tensor([[10, 11, 12, 13]])
    plain = GenerationConfig(max_new_tokens=8, return_dict_in_generate=True)
    plain.threshold, plain.output_history = 1.0, True  # as TRL would pass through a plain config
    out = dlm.generate(ids, generation_config=plain, eos_token_id=None)
    assert out.nfe == 8 and len(out.history) == 8
    assert (out.history[0] == MASK).sum() == 7 and (out.history[-1] != MASK).all()
    assert torch.equal(out.history[-1], out.sequences[:, 4:])


def test_saved_generation_config_round_trips(tmp_path):
    result = convert(ar_model=tiny_ar_model("llama"), tokenizer=tiny_tokenizer(), output_dir=tmp_path / "c",
                     block_size=8)
    loaded = EfficientDlmGenerationConfig.from_pretrained(tmp_path / "c")
    assert isinstance(loaded, EfficientDlmGenerationConfig)
    assert loaded.threshold == 0.9 and loaded.block_size == 8 and loaded.eos_token_id == 2
    assert result.model.generation_config.threshold == 0.9


def test_pipeline_text_generation_with_trust_remote_code(tmp_path):
    convert(ar_model=tiny_ar_model("qwen3"), tokenizer=tiny_tokenizer(("<|fim_pad|>",)), output_dir=tmp_path / "c",
            block_size=4)
    generator = pipeline("text-generation", model=str(tmp_path / "c"), trust_remote_code=True)
    out = generator("w30 w31 w32", max_new_tokens=8, threshold=0.5, eos_token_id=None)
    assert out[0]["generated_text"].startswith("w30 w31 w32") and len(out[0]["generated_text"].split()) > 3


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
    ({"threshold": 1.5}, r"threshold must be in \(0, 1\]"),
    ({"block_size": 0}, "block_size must be an integer >= 1"),
    ({"sub_block_size": 0}, "sub_block_size must be an integer >= 1"),
    ({"sub_block_size": 3}, r"sub_block_size \(3\) must divide block_size \(4\)"),
    ({"max_new_tokens": 0}, "max_new_tokens.* must be greater than 0"),
    ({"max_new_tokens": 600}, "beyond the model's max_position_embeddings"),
    ({"steps": 0}, "steps .* must be an integer >= 1"),
    ({"factor": -1.0}, "factor must be a number > 0"),
    ({"top_p": 0.0, "do_sample": True}, r"top_p must be in \(0, 1\]"),
    ({"bogus_option": 1}, r"unknown arguments \['bogus_option'\]"),
    ({"cache_implementation": "offloaded"}, "cache_implementation must be 'static', 'dynamic' or None"),
    ({"compile": "yes", "cache_implementation": "static"}, "compile must be True or False"),
    ({"compile": True, "cache_implementation": "dynamic"}, "compile=True needs the static decoding path"),
    ({"kernels": "flash", "cache_implementation": "static"}, "kernels must be 'auto', 'none', 'all' or names among"),
])
def test_bad_generation_arguments(kwargs, message):
    dlm = converted(block_size=4)
    with pytest.raises(ValueError, match=message):
        dlm.generate(torch.tensor([[10, 11, 12]]), **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts():
    dlm = converted(block_size=4)
    with pytest.raises(ValueError, match="right padding"):
        dlm.generate(torch.tensor([[10, 11, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        dlm.generate(torch.tensor([[0, 0]]), attention_mask=torch.tensor([[0, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty"):
        dlm.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        dlm.generate(torch.tensor([[10]]), max_new_tokens=4, stop_strings=["x"])


def test_a_model_without_mask_token_id_cannot_generate():
    dlm = converted(block_size=4)
    dlm.config.mask_token_id = None
    with pytest.raises(ValueError, match="no mask_token_id"):
        dlm.generate(torch.tensor([[10, 11]]), max_new_tokens=4)


def test_finished_rows_leave_the_batch():
    dlm = converted(block_size=4)
    ids, mask = left_padded_batch([6, 6], seed=9)
    free = dlm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, threshold=0.5)
    # A token row 0 commits in its first block and row 1 never produces: as EOS it ends row 0 only.
    eos = next(t for t in free[0, 6:10].tolist() if t not in free[1, 6:].tolist())
    batch_sizes = []
    hook = dlm.model.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]), with_kwargs=True)
    try:
        out = dlm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, threshold=0.5,
                           return_dict_in_generate=True)
    finally:
        hook.remove()
    assert len(batch_sizes) == out.nfe and batch_sizes[0] == 2 and batch_sizes[-1] == 1
    assert torch.equal(out.sequences[1, 6:], free[1, 6:])  # the remaining row is unaffected


def test_text_diffusion_streamer_gets_drafts_and_the_committed_blocks(capsys):
    from transformers import TextDiffusionStreamer

    tokenizer = tiny_tokenizer()
    dlm = converted(block_size=4)
    ids = tokenizer("w20 w21 w22", return_tensors="pt").input_ids
    drafts = []

    class Recording(TextDiffusionStreamer):
        def put_draft(self, value, **kwargs):
            drafts.append(value)
            super().put_draft(value, **kwargs)

    out = dlm.generate(ids, max_new_tokens=8, eos_token_id=None, threshold=0.5, streamer=Recording(tokenizer),
                       return_dict_in_generate=True)
    assert len(drafts) == out.nfe
    assert tokenizer.decode(out.sequences[0, 3:]).split()[-1] in capsys.readouterr().out
