"""Load a checkpoint folder as a Hub user would, and generate a few tokens. Run by `validate_checkpoint` in a child
interpreter (`python -c <this file's text> FOLDER OPTIONS_JSON`); not imported by the package.

`efficient_dlm` is made unimportable before anything else, so every class that loads comes from the code shipped in
the folder (through trust_remote_code), never from an installed copy of the package. On success the last stdout line
is a JSON report; on failure the process exits non-zero and the last stderr line says why.

OPTIONS_JSON: {"kind": "model" | "adapter", "max_new_tokens": int, "threshold": float, "base": adapter's base}
"""

import sys

sys.modules["efficient_dlm"] = None  # `import efficient_dlm` now raises ImportError

import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

PROMPT = "The capital of France is"


class LoadCheckFailed(Exception):
    pass


def load(folder: str, options: dict):
    """The model (with the adapter applied, for an adapter folder) and its tokenizer."""
    if options["kind"] == "adapter":
        from peft import PeftModel

        base = AutoModel.from_pretrained(options["base"], trust_remote_code=True, dtype="auto")
        model = PeftModel.from_pretrained(base, folder)
        core = base
        has_own_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(folder if has_own_tokenizer else options["base"],
                                                  trust_remote_code=True)
    else:
        model = core = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    # Classes loaded through trust_remote_code live in transformers' dynamic-module namespace.
    module = type(core).__module__
    if not module.startswith("transformers_modules"):
        raise LoadCheckFailed(f"the model class came from {module}, not from the code shipped in the folder")
    return model, core, tokenizer


def main(folder: str, options: dict) -> dict:
    model, core, tokenizer = load(folder, options)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    mask_token_id = core.config.mask_token_id
    if tokenizer.mask_token is not None and tokenizer.mask_token_id != mask_token_id:
        raise LoadCheckFailed(
            f"tokenizer mask token {tokenizer.mask_token!r} has id {tokenizer.mask_token_id}, "
            f"config.mask_token_id is {mask_token_id}"
        )
    inputs = tokenizer([PROMPT], return_tensors="pt").to(device)
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = options["max_new_tokens"]
    with torch.no_grad():
        output = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=new_tokens,
            threshold=options["threshold"],
        )
    sequences = getattr(output, "sequences", output)
    if not isinstance(sequences, torch.Tensor) or sequences.dtype != torch.long or sequences.dim() != 2:
        raise LoadCheckFailed(f"generate returned {type(sequences).__name__}, expected a 2-D LongTensor")
    if sequences.shape[0] != 1 or not prompt_length < sequences.shape[1] <= prompt_length + new_tokens:
        raise LoadCheckFailed(
            f"generate returned shape {tuple(sequences.shape)}, expected (1, {prompt_length} + 1..{new_tokens})"
        )
    if not torch.equal(sequences[:, :prompt_length].cpu(), inputs["input_ids"].cpu()):
        raise LoadCheckFailed("generate changed the prompt tokens")
    generated = sequences[0, prompt_length:].tolist()
    if mask_token_id in generated:
        raise LoadCheckFailed(f"generate left mask tokens (id {mask_token_id}) in its output: {generated}")
    return {
        "model_class": type(core).__name__,
        "wrapper_class": type(model).__name__,
        "device": device,
        "dtype": str(core.dtype).replace("torch.", ""),
        "prompt": PROMPT,
        "generated_ids": generated,
        "generated_text": tokenizer.decode(generated),
    }


if __name__ == "__main__":
    try:
        report = main(sys.argv[1], json.loads(sys.argv[2]))
    except LoadCheckFailed as failure:
        print(f"load check failed: {failure}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps(report))
