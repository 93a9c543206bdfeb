"""Convert SmolLM2-135M-Instruct into a block-diffusion LM on real Python source, and run the paper's two ablations.

One self-contained GPU run (issue 4). Data: the Python files of the machine's own standard library, split by file
into train and held-out. Every variant trains from the same converted parent for the same number of steps and rows:

    recipe            bd3 (clean context) + position-dependent masking (lambda 0.1), in-place prediction, 1/t
    noisy_context     block-causal over x_t alone (no clean copy)             } attention ablation
    bidirectional     whole-sequence attention over x_t (Dream-style)         }
    uniform           bd3 + uniform masking                                   } masking ablation

and is then measured on held-out files: ELBO-NLL (bits/token, uniform forward process, block-wise) next to the AR
parent's NLL, greedy agreement with the AR parent's continuation, and tokens per forward + agreement for
tau in {0.95, 0.9, 0.8, 0.7}. Prints a table, writes JSON and a PNG.

    python experiments/convert_smollm2.py --gguf PATH --out DIR [--steps 400] [--variants recipe,uniform,...]
"""

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_dlm.conversion import dlm_from_ar_model, embedded_gguf_path  # noqa: E402
from efficient_dlm.evaluation import next_token_nll  # noqa: E402
from efficient_dlm.training import (  # noqa: E402
    DlmConversionConfig,
    DlmConversionTrainer,
    build_training_dataset,
    masked_token_loss_sum,
    noise_batch,
)

VARIANTS = {
    "recipe": {"attention": "bd3", "masking": "position_dependent"},
    "noisy_context": {"attention": "noisy_context", "masking": "position_dependent"},
    "bidirectional": {"attention": "bidirectional", "masking": "position_dependent"},
    "uniform": {"attention": "bd3", "masking": "uniform"},
}
THRESHOLDS = (0.95, 0.9, 0.8, 0.7)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def python_source_split(held_out_share: float = 0.05):
    """Stdlib .py files (tests excluded), split deterministically by a hash of the file name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts and "idlelib" not in p.parts
                   and p.stat().st_size > 2000)
    held = [p for p in files if int(hashlib.sha1(p.name.encode()).hexdigest(), 16) % 1000 < held_out_share * 1000]
    train = [p for p in files if p not in set(held)]
    return [str(p) for p in train], [str(p) for p in held]


@torch.no_grad()
def elbo_bits_per_token(model, rows, block_size, draws=4, batch=16, seed=0):
    """Block-wise masked-diffusion NELBO per token (uniform forward process, 1/t weight), in bits."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch):
        ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows[start:start + batch]]).to(DEVICE)
        for _ in range(draws):
            noised = noise_batch(ids, ids.clone(), mask_token_id=model.config.mask_token_id, block_size=block_size,
                                 masking="uniform", weighting="elbo", attention="bd3", generator=generator)
            logits = model(**noised.model_inputs()).logits
            total += masked_token_loss_sum(logits, noised).item()
            tokens += ids.numel()
    return total / tokens / math.log(2)


@torch.no_grad()
def ar_bits_per_token(parent, rows, batch=16):
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows[start:start + batch]]).to(DEVICE)
        nll = next_token_nll(parent(ids).logits, ids, torch.ones_like(ids))
        total += nll.sum().item() * (ids.shape[1] - 1)
        count += ids.numel() - ids.shape[0]
    return total / count / math.log(2)


@torch.no_grad()
def decode_against_parent(dlm, parent_continuations, prompts, block_size, new_tokens):
    """TPF and agreement with the parent's greedy continuation, per threshold."""
    rows = []
    for threshold in THRESHOLDS:
        out = dlm.generate(prompts, max_new_tokens=new_tokens, block_size=block_size, threshold=threshold,
                           eos_token_id=[], return_dict_in_generate=True)
        completion = out.sequences[:, prompts.shape[1]:]
        agree = (completion == parent_continuations).float()
        first_miss = torch.where(agree == 0, torch.arange(new_tokens, device=agree.device), new_tokens).min(-1).values
        rows.append({"threshold": threshold, "tpf": out.tokens_per_forward, "nfe": out.nfe,
                     "agreement": agree.mean().item(), "matching_prefix": first_miss.float().mean().item()})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--held-out-rows", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = args.gguf or str(embedded_gguf_path())
    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    parent = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(DEVICE).eval()
    mask_id = tokenizer.convert_tokens_to_ids("<empty_output>")

    train_files, held_files = python_source_split()
    train_rows = build_training_dataset(train_files, tokenizer, seq_len=args.seq_len, block_size=args.block_size,
                                        max_tokens=args.steps * args.batch * args.seq_len, show_progress=False)
    held_rows = build_training_dataset(held_files, tokenizer, seq_len=args.seq_len, block_size=args.block_size,
                                       show_progress=False)
    held_rows = [held_rows[i] for i in range(min(args.held_out_rows, len(held_rows)))]
    prompts = torch.stack([torch.as_tensor(held_rows[i]["input_ids"][:64]) for i in range(args.prompts)]).to(DEVICE)
    parent_continuations = parent.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                           do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, prompts.shape[1]:]
    print(f"data: {len(train_files)} train files -> {len(train_rows)} rows of {args.seq_len}; "
          f"{len(held_files)} held-out files -> {len(held_rows)} rows", flush=True)

    results = {"ar_bits_per_token": ar_bits_per_token(parent, held_rows), "variants": {}}
    untrained = dlm_from_ar_model(parent, block_size=args.block_size, shift_logits=False, mask_token_id=mask_id)
    results["untrained"] = {
        "elbo_bits_per_token": elbo_bits_per_token(untrained, held_rows, args.block_size),
        "decoding": decode_against_parent(untrained, parent_continuations, prompts, args.block_size, args.new_tokens),
    }
    del untrained
    for variant in args.variants.split(","):
        model = dlm_from_ar_model(parent, block_size=args.block_size, shift_logits=False, mask_token_id=mask_id)
        config = DlmConversionConfig(
            output_dir=str(out / f"run-{variant}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, warmup_steps=max(1, args.steps // 20), bf16=DEVICE == "cuda", seq_len=args.seq_len,
            block_size=args.block_size, logging_steps=max(1, args.steps // 10), save_strategy="no",
            report_to=[], seed=0, **VARIANTS[variant],
        )
        trainer = DlmConversionTrainer(model, config, train_dataset=train_rows, processing_class=tokenizer)
        t0 = time.time()
        trainer.train()
        # Mixed precision wraps forward in autocast for training; evaluate the plain model.
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results["variants"][variant] = {
            **VARIANTS[variant],
            "train_seconds": time.time() - t0,
            "losses": losses,
            "elbo_bits_per_token": elbo_bits_per_token(model, held_rows, args.block_size),
            "decoding": decode_against_parent(model, parent_continuations, prompts, args.block_size, args.new_tokens),
        }
        print(f"{variant}: {results['variants'][variant]['elbo_bits_per_token']:.3f} bits/token, "
              f"{time.time() - t0:.0f}s", flush=True)
        del model, trainer
        torch.cuda.empty_cache()

    results.update({
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "cuda": torch.version.cuda,
        "seconds": time.time() - started, "args": vars(args),
        "data": {"train_files": len(train_files), "held_out_files": len(held_files),
                 "train_tokens": len(train_rows) * args.seq_len, "held_out_rows": len(held_rows)},
    })
    (out / "convert_smollm2.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "convert_smollm2.png")
    print_table(results)
    return 0


def print_table(results):
    print(f"\nAR parent NLL on held-out files: {results['ar_bits_per_token']:.3f} bits/token")
    header = f"{'variant':<15} {'ELBO bits/tok':>13} " + " ".join(f"{'tau ' + str(t):>16}" for t in THRESHOLDS)
    print(header + "\n" + " " * 30 + "  (TPF / agreement with AR greedy)")
    entries = [("untrained", results["untrained"])] + list(results["variants"].items())
    for name, entry in entries:
        cells = " ".join(f"{d['tpf']:>7.2f} / {d['agreement']:.2f}" for d in entry["decoding"])
        print(f"{name:<15} {entry['elbo_bits_per_token']:>13.3f} {cells}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    entries = [("untrained", results["untrained"])] + list(results["variants"].items())
    for name, entry in entries:
        decoding = entry["decoding"]
        right.plot([d["tpf"] for d in decoding], [d["agreement"] for d in decoding], marker="o", label=name)
        if "losses" in entry:
            left.plot(entry["losses"], label=name)
    left.set(title="training loss (per logging step)", xlabel="logging step", ylabel="loss")
    right.set(title="decoding: tokens per forward vs agreement with AR greedy", xlabel="tokens per forward",
              ylabel="token agreement with the AR parent")
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
