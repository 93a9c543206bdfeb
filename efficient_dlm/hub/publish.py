"""Upload a checkpoint folder to the Hugging Face Hub: validate, write README.md, push.

Order matters, and each step only starts when the previous one has passed:
1. arguments (repo id, result files) — cheap, so a typo fails at once;
2. `validate_checkpoint` — static checks, the card rendered in memory, then a load + generate in a fresh
   interpreter; no network;
3. the card written into `README.md` (replacing what was there: often peft's or the Trainer's placeholder card);
4. the push: `create_repo(exist_ok=True)`, `create_branch` for a revision other than main, then one
   `upload_folder` commit restricted to exactly the files that were validated.

If the push fails (no network, offline mode, no token, the Hub refuses), the folder is put back as it was before the
command — README.md restored or removed — so a failed upload leaves no trace; the card is a pure function of the
folder and the result files, so the next attempt renders the same one. `dry_run=True` stops before step 4 and keeps
README.md, so the card can be read before it is published.

The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`); this module never reads, prints or
writes it, it only asks whether one exists.
"""

import argparse
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .cards import check_repo_id, is_generated_card, load_bench_results, load_eval_results, render_card
from .validation import (
    DEFAULT_LOAD_TIMEOUT_S,
    README,
    CheckpointError,
    CheckpointReport,
    FileEntry,
    format_size,
    run_load_check,
    validate_checkpoint,
)


class UploadError(RuntimeError):
    """The push itself failed (network, offline mode, authentication, the Hub refused). The folder was valid."""


@dataclass
class UploadResult:
    repo_id: str
    url: str | None  # the repo (or branch) page; None on a dry run
    revision: str | None
    files: list[FileEntry]
    report: CheckpointReport
    readme_written: bool
    dry_run: bool
    commit_url: str | None = None


def _network_error_types() -> tuple[type, ...]:
    """Exception types that mean "the Hub could not be reached", from whichever HTTP stack huggingface_hub uses."""
    types: list[type] = [ConnectionError, TimeoutError]  # includes huggingface_hub's OfflineModeIsEnabled
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
        ("urllib3.exceptions", ("NewConnectionError", "MaxRetryError")),
    ):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        types.extend(getattr(imported, name) for name in names if hasattr(imported, name))
    return tuple(types)


def _causes(error: BaseException):
    """The error and the errors it was raised from, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def explain_push_failure(error: BaseException, repo_id: str, endpoint: str, repo_created: bool) -> str:
    """One line saying why the push failed and what to do, without the token or a traceback."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    state = (
        f"the repository {repo_id} exists but no commit was made" if repo_created else "nothing was uploaded"
    )
    network_types = _network_error_types()
    for cause in _causes(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return (f"cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE is set); unset it and run again. "
                    f"The checkpoint passed validation; {state}.")
        if isinstance(cause, LocalTokenNotFoundError):
            return (f"cannot push to the Hub: no Hugging Face token found; run `hf auth login` or set HF_TOKEN. "
                    f"The checkpoint passed validation; {state}.")
        if isinstance(cause, HfHubHTTPError):
            status = getattr(getattr(cause, "response", None), "status_code", None)
            advice = (" (check that your token has write access to this namespace)" if status in (401, 403) else "")
            first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            return f"the Hub refused the push (HTTP {status}){advice}: {first_line}. {state[0].upper() + state[1:]}."
        if isinstance(cause, network_types):
            return (f"cannot reach the Hugging Face Hub at {endpoint}: network error ({type(cause).__name__}: "
                    f"{cause}). Check the network connection (or HF_ENDPOINT) and run again. "
                    f"The checkpoint passed validation; {state}.")
    return f"push to {repo_id} failed: {type(error).__name__}: {error}. {state[0].upper() + state[1:]}."


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _allow_pattern(path: str) -> str:
    # upload_folder matches allow_patterns with fnmatch; escape names that contain [, * or ?.
    return glob.escape(path)


def _push(folder: Path, repo_id: str, files: list[FileEntry], *, private: bool, revision: str | None,
          commit_message: str) -> tuple[str, str | None]:
    """create_repo + (create_branch) + upload_folder; returns (page URL, commit URL). UploadError on failure."""
    from huggingface_hub import HfApi, get_token

    endpoint = _hub_endpoint()
    repo_created = False
    try:
        if get_token() is None:  # only asks whether a token exists; the value stays inside huggingface_hub
            raise UploadError(
                "cannot push to the Hub: no Hugging Face token found; run `hf auth login` or set HF_TOKEN. "
                "The checkpoint passed validation; nothing was uploaded."
            )
        api = HfApi()
        # private=None, not False, without --private: a new repo then follows the namespace's default visibility
        # (an organisation that makes repos private by default stays private). An existing repo keeps its own.
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        repo_created = True
        if revision not in (None, "main"):
            # upload_folder does not create branches; create it (from main) if it is new.
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message,
            allow_patterns=[_allow_pattern(entry.path) for entry in files],
        )
    except UploadError:
        raise
    except Exception as error:  # noqa: BLE001 - every failure here is reported as one clear UploadError
        raise UploadError(explain_push_failure(error, repo_id, endpoint, repo_created)) from error
    page = str(repo_url).rstrip("/")
    if revision not in (None, "main"):
        page += f"/tree/{revision}"
    return page, getattr(commit, "commit_url", None)


class _ReadmeWrite:
    """Write README.md and remember what was there, so that a failed push can put the folder back as it was."""

    def __init__(self, folder: Path):
        self.path = folder / README
        self.previous = self.path.read_bytes() if self.path.is_file() else None
        self.written = False

    def write(self, text: str) -> None:
        partial = self.path.with_name(README + ".partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, self.path)  # atomic: README.md is either the old card or the whole new one
        self.written = True

    def undo(self) -> None:
        if not self.written:
            return
        if self.previous is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.write_bytes(self.previous)
        self.written = False


def upload(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    eval_file: str | os.PathLike | None = None,
    bench_file: str | os.PathLike | None = None,
    *,
    license: str | None = None,  # noqa: A002 - the Hub's name for the field
    base_model: str | None = None,
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
    log=print,
) -> UploadResult:
    """Validate `folder`, render its card into README.md and push it to `repo_id` (see the module docstring).

    Raises ValueError (CheckpointError for the folder itself) on bad input, before anything is written, and
    UploadError if the push fails, after putting README.md back as it was.
    """
    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or " " in revision):
        raise ValueError(f"revision must be a branch name without spaces, got {revision!r}")
    if eval_file is not None:
        load_eval_results(eval_file)  # parse now: a broken result file must not cost a full validation first
    if bench_file is not None:
        load_bench_results(bench_file)

    # validate_checkpoint in two halves, with the card rendered (in memory) in between: a card that cannot be
    # written (an adapter whose base has no Hub id) should fail before the slow load check, not after it.
    report = validate_checkpoint(folder, check_loading=False)
    card = render_card(folder, repo_id, eval_file=eval_file, bench_file=bench_file, license=license,
                       base_model=base_model)
    report.load = run_load_check(folder, report.kind, report.config, load_timeout_s)
    log(f"validated {folder} ({report.kind}): {report.load['model_class']} loads with trust_remote_code in a fresh "
        f"interpreter without efficient_dlm and generated {len(report.load['generated_ids'])} tokens "
        f"({report.load['seconds']} s)")
    for note in report.notes:
        log(f"note: {note}")

    readme = _ReadmeWrite(folder)
    if readme.previous is not None and not is_generated_card(readme.previous.decode("utf-8", errors="replace")):
        # Usually peft's or the Trainer's placeholder card; the folder's own records say more, so it is replaced.
        log(f"replacing the README.md in {folder}, which was not generated by efficient-dlm")
    readme.write(card)
    log(f"wrote {readme.path} ({format_size(len(card.encode('utf-8')))})")

    # Exactly the validated files (plus the card): anything that appears in the folder later is not sent.
    card_entry = FileEntry(README, readme.path.stat().st_size)
    files = sorted([entry for entry in report.files if entry.path != README] + [card_entry], key=lambda e: e.path)
    target = repo_id + (" (private)" if private else "") + (f" at revision {revision}" if revision else "")
    total = format_size(sum(entry.size for entry in files))

    if dry_run:
        log(f"dry run: would upload {len(files)} files ({total}) to {target}:")
        for entry in files:
            log(f"  {format_size(entry.size):>10}  {entry.path}")
        return UploadResult(repo_id, None, revision, files, report, readme.written, dry_run=True)

    message = commit_message or f"Upload {report.kind} with efficient-dlm"
    log(f"uploading {len(files)} files ({total}) to {target} ...")
    try:
        url, commit_url = _push(folder, repo_id, files, private=private, revision=revision, commit_message=message)
    except BaseException:
        readme.undo()  # a failed push leaves the folder exactly as it was before this command
        raise
    log(f"uploaded: {url}")
    return UploadResult(repo_id, url, revision, files, report, readme.written, dry_run=False, commit_url=commit_url)


# ---------------------------------------------------------------------------------------------------------------
# Command line (upload.py and `efficient-dlm upload`)
# ---------------------------------------------------------------------------------------------------------------


def add_upload_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The upload options, shared by upload.py and `efficient-dlm upload`."""
    parser.add_argument("checkpoint_dir", help="a converted checkpoint folder, or a peft LoRA adapter folder")
    parser.add_argument("--repo-id", required=True, help="target repository on the Hub, OWNER/NAME")
    parser.add_argument("--private", action="store_true",
                        help="create the repository as private (if it is new; default: the namespace's default)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit-message", default=None, help="commit message (default: 'Upload model with ...')")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and write README.md, then list what would be uploaded; push nothing")
    parser.add_argument("--eval", dest="eval_file", default=None, metavar="FILE",
                        help="evaluation results JSON: accuracy table and the card's model-index")
    parser.add_argument("--bench", dest="bench_file", default=None, metavar="FILE",
                        help="benchmark results JSON: the card's speed table")
    parser.add_argument("--license", default=None,
                        help="Hub license id for the card (default: the base model's when known, else 'other')")
    parser.add_argument("--base-model", default=None, metavar="OWNER/NAME",
                        help="Hub id of the base model when the folder's records name only a local path "
                             "(required for an adapter whose base_model_name_or_path is a local folder)")
    parser.add_argument("--verbose", action="store_true", help="on a failed load check, print its traceback")
    parser.set_defaults(upload_prog=parser.prog)
    return parser


def run_upload(args: argparse.Namespace) -> int:
    """Run an upload from parsed arguments: 0 on success, 2 on bad input (one-line message), 1 if the push failed."""
    prog = getattr(args, "upload_prog", "upload")
    try:
        upload(
            args.checkpoint_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
            eval_file=args.eval_file,
            bench_file=args.bench_file,
            license=args.license,
            base_model=args.base_model,
        )
    except CheckpointError as error:
        if error.details and getattr(args, "verbose", False):
            print(error.details.rstrip(), file=sys.stderr)
        hint = " (run with --verbose for the load check's traceback)" if error.details and not args.verbose else ""
        print(f"{prog}: error: {error}{hint}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except UploadError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    return 0
