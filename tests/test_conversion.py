"""Conversion: sources (folder, Hub cache, GGUF, embedded default), mask-token choice, the checkpoint folder, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_ar_model, tiny_tokenizer
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from efficient_dlm import cli
from efficient_dlm.conversion import CONVERSION_RECORD, SHIPPED_CODE_FILES, convert, resolve_base


@pytest.fixture
def qwen3_folder(tmp_path):
    """A transformers folder holding a tiny random Qwen3 with a tokenizer that has `<|fim_pad|>`."""
    folder = tmp_path / "qwen3-tiny"
    tiny_ar_model("qwen3").save_pretrained(folder)
    tiny_tokenizer(extra_special=("<|fim_pad|>", "<|im_start|>")).save_pretrained(folder)
    return folder


def test_folder_conversion_writes_a_complete_checkpoint(qwen3_folder, tmp_path):
    out = tmp_path / "dlm"
    result = convert(qwen3_folder, out, block_size=4)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            CONVERSION_RECORD, *SHIPPED_CODE_FILES} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "efficient_dlm" and config["base_model_type"] == "qwen3"
    assert config["qk_norm"] is True and config["block_size"] == 4 and config["shift_logits"] is False
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    # The official checkpoints' choice: the unused `<|fim_pad|>` special token.
    assert result.mask_token == "<|fim_pad|>"
    assert config["mask_token_id"] == result.tokenizer.convert_tokens_to_ids("<|fim_pad|>")
    assert json.loads((out / "tokenizer_config.json").read_text())["mask_token"] == "<|fim_pad|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    record = json.loads((out / CONVERSION_RECORD).read_text())
    assert record["base_kind"] == "folder" and record["block_size"] == 4
    # Tensor names are the parent's: the weights load into a transformers Qwen3 untouched.
    parent = load_file(qwen3_folder / "model.safetensors")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(parent)
    for name, tensor in parent.items():
        assert torch.equal(ours[name], tensor), name


def test_without_an_unused_special_token_a_new_mask_token_starts_at_the_mean_embedding():
    ar = tiny_ar_model("llama")
    mean_before = ar.model.embed_tokens.weight.detach().mean(0).clone()
    tokenizer = tiny_tokenizer()
    result = convert(ar_model=ar, tokenizer=tokenizer, block_size=4)
    token_id = result.model.config.mask_token_id
    assert result.mask_token == "<|mask|>" and token_id == 128
    assert result.model.config.vocab_size == 129 and len(result.tokenizer) == 129
    torch.testing.assert_close(result.model.model.embed_tokens.weight[token_id], mean_before)


def test_an_explicit_mask_token_by_string_or_id(qwen3_folder):
    by_string = convert(qwen3_folder, mask_token="w7")
    assert by_string.mask_token == "w7"
    token_id = by_string.model.config.mask_token_id
    by_id = convert(qwen3_folder, mask_token=str(token_id))
    assert by_id.mask_token == "w7" and by_id.model.config.mask_token_id == token_id


def test_hub_id_resolves_through_the_hub_cache_offline(tmp_path):
    # The network is the one thing mocked: a Hub cache laid out as huggingface_hub writes it, read offline.
    snapshot = tmp_path / "hub" / "models--someone--qwen2-tiny" / "snapshots" / ("a" * 40)
    tiny_ar_model("qwen2").save_pretrained(snapshot)
    tiny_tokenizer(extra_special=("<|fim_pad|>",)).save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    done = subprocess.run(
        [sys.executable, "-m", "efficient_dlm.cli", "convert", "--base", "someone/qwen2-tiny",
         "--output", str(tmp_path / "out"), "--block-size", "8"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Hub repo someone/qwen2-tiny" in done.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["base_model_type"] == "qwen2" and config["attention_bias"] and not config["attention_output_bias"]


def test_cli_convert(qwen3_folder, tmp_path, capsys):
    out = tmp_path / "cli-out"
    code = cli.main(["convert", "--base", str(qwen3_folder), "--output", str(out), "--block-size", "16",
                     "--shift-logits", "--dtype", "bfloat16"])
    assert code == 0
    assert "mask_token='<|fim_pad|>'" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["block_size"] == 16 and config["shift_logits"] is True and config["dtype"] == "bfloat16"
    # An existing folder is never silently replaced.
    assert cli.main(["convert", "--base", str(qwen3_folder), "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(["convert", "--base", str(qwen3_folder), "--output", str(out), "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_base_architecture_in_a_folder(tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    with pytest.raises(ValueError, match="unknown base architecture 'gpt2'.*supported are"):
        convert(folder)


def test_unknown_base_architecture_in_a_gguf_file(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unknown base architecture 'gpt2'"):
        convert(path)


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        convert(tmp_path / "absent")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        convert(not_gguf)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        convert(tmp_path)


@pytest.mark.parametrize("mask_token,message", [
    ("<never-seen>", "is not in the vocabulary"),
    ("100000", "mask token id 100000 is not in the vocabulary"),
    ("</s>", "collides with the EOS token"),
    ("<pad>", "collides with the PAD token"),
])
def test_bad_mask_tokens(qwen3_folder, mask_token, message):
    with pytest.raises(ValueError, match=message):
        convert(qwen3_folder, mask_token=mask_token)


@pytest.mark.parametrize("bad", [0, -1])
def test_block_size_below_one(qwen3_folder, bad, tmp_path, capsys):
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        convert(qwen3_folder, block_size=bad)
    assert cli.main(["convert", "--base", str(qwen3_folder), "--output", str(tmp_path / "x"),
                     "--block-size", str(bad)]) == 2
    assert "block_size must be an integer >= 1" in capsys.readouterr().err


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert(ar_model=tiny_ar_model("llama"), tokenizer=tiny_tokenizer(), dtype="int8")


def test_resolve_base_defaults_to_the_embedded_smollm2():
    source = resolve_base(None)
    assert source.kind == "gguf" and source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_tokenizer_ends_turns_where_the_model_config_says(smollm2_gguf_path):
    # transformers 5.17 reads SmolLM2's GGUF tokenizer with EOS = <|im_start|> and no pad token; chat answers then
    # run past <|im_end|>. load_ar_model aligns the tokenizer with the config (EOS <|im_end|>, pad = EOS).
    import torch

    from efficient_dlm.conversion import load_ar_model, resolve_base

    model, tokenizer = load_ar_model(resolve_base(smollm2_gguf_path), torch.float32)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
