#!/usr/bin/env python
"""Validate an Efficient-DLM checkpoint folder (or a peft LoRA adapter folder), write its model card and push it to
the Hugging Face Hub.

Validation runs first and makes no network call: safetensors weights only, config with auto_map and mask_token_id,
the shipped model code, a tokenizer with the mask token, no credentials or large stray files, and the folder must
load with trust_remote_code in a fresh interpreter without efficient_dlm installed and generate a few tokens. Then
README.md is rendered into the folder and the folder is pushed (create_repo + upload_folder). --dry-run stops
before the push and lists what would be uploaded. The token comes from `hf auth login` or HF_TOKEN.

    python upload.py runs/my-dlm --repo-id me/my-dlm --eval eval.json --bench bench.json --dry-run

Same as `efficient-dlm upload`; the work is done by efficient_dlm.hub.
"""

import argparse
import sys

from efficient_dlm.hub import add_upload_arguments, run_upload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="upload.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_upload_arguments(parser)
    return run_upload(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
