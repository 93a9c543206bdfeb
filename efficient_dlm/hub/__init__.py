"""Publishing: model cards, checkpoint validation and upload to the Hugging Face Hub.

- `validate_checkpoint(folder)`: is a converted model (or a peft LoRA adapter) folder fit to publish? Raises
  `CheckpointError` naming each problem; runs no network call.
- `render_card(folder, repo_id, ...)`: its README.md, from the template in `templates/`.
- `upload(folder, repo_id, ...)`: validate, write README.md, push with huggingface_hub (or list the files, dry run).
- `add_upload_arguments(parser)` / `run_upload(args)`: the command line, used by upload.py and `efficient-dlm upload`.
"""

from .cards import TEMPLATES_DIR, is_generated_card, load_bench_results, load_eval_results, render_card
from .publish import UploadError, UploadResult, add_upload_arguments, explain_push_failure, run_upload, upload
from .validation import (
    CheckpointError,
    CheckpointReport,
    FileEntry,
    checkpoint_kind,
    list_upload_files,
    validate_checkpoint,
)

__all__ = [
    "TEMPLATES_DIR",
    "CheckpointError",
    "CheckpointReport",
    "FileEntry",
    "UploadError",
    "UploadResult",
    "add_upload_arguments",
    "checkpoint_kind",
    "explain_push_failure",
    "is_generated_card",
    "list_upload_files",
    "load_bench_results",
    "load_eval_results",
    "render_card",
    "run_upload",
    "upload",
    "validate_checkpoint",
]
