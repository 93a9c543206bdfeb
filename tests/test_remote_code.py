"""Round trip: convert -> save -> load where `efficient_dlm` cannot be imported (trust_remote_code) -> same logits."""

import subprocess
import sys

import pytest
import torch
from conftest import left_padded_batch, tiny_ar_model, tiny_tokenizer
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from efficient_dlm import EfficientDlmConfig, EfficientDlmForMaskedDiffusion
from efficient_dlm.conversion import convert

# Runs in a fresh interpreter with the package blocked: everything must come from the checkpoint folder.
LOAD_WITHOUT_PACKAGE = """
import sys, torch
sys.modules["efficient_dlm"] = None
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
folder, inputs_path, out_path = sys.argv[1:4]
inputs = torch.load(inputs_path)
results = {}
for auto in (AutoModel, AutoModelForCausalLM):
    model = auto.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "EfficientDlmForMaskedDiffusion", type(model)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        results[auto.__name__] = model(**inputs).logits
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
results["mask_token_id"] = tokenizer.mask_token_id
torch.save(results, out_path)
"""


def load_in_clean_interpreter(folder, inputs, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "o.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "o.pt")


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_tiny_round_trip_without_the_package(family, tmp_path):
    result = convert(ar_model=tiny_ar_model(family, tie=family == "llama"),
                     tokenizer=tiny_tokenizer(("<|fim_pad|>",)), output_dir=tmp_path / "ckpt", block_size=4)
    input_ids, attention_mask = left_padded_batch([10, 6])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        expected = result.model(**inputs).logits
    loaded = load_in_clean_interpreter(tmp_path / "ckpt", inputs, tmp_path)
    for name in ("AutoModel", "AutoModelForCausalLM"):
        torch.testing.assert_close(loaded[name], expected, rtol=0, atol=0)
    assert loaded["mask_token_id"] == result.model.config.mask_token_id


def test_in_process_registration_needs_no_trust_remote_code(tmp_path):
    convert(ar_model=tiny_ar_model("qwen3"), tokenizer=tiny_tokenizer(), output_dir=tmp_path / "ckpt")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "ckpt"), EfficientDlmConfig)
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(tmp_path / "ckpt")
        assert type(model) is EfficientDlmForMaskedDiffusion


def test_embedded_smollm2_round_trip_matches_the_ar_parent(smollm2_parent, tmp_path):
    """The real model end to end: the CLI converts the embedded GGUF, a clean interpreter loads the folder."""
    from efficient_dlm import cli

    assert cli.main(["convert", "--output", str(tmp_path / "smol"), "--block-size", "1", "--shift-logits"]) == 0
    ar, tokenizer = smollm2_parent
    batch = tokenizer(["Simple is better than complex.", "Now is better than never, they say"],
                      return_tensors="pt", padding=True, padding_side="left")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = ar(**inputs).logits
    loaded = load_in_clean_interpreter(tmp_path / "smol", inputs, tmp_path)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(loaded["AutoModel"][real], expected[real], rtol=1e-4, atol=1e-4)
    assert loaded["mask_token_id"] == 16  # `<empty_output>`, a special token a chat never uses
