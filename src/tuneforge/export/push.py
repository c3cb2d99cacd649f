"""`tuneforge push RUN_DIR --repo NAME --what adapter|merged|gptq|gguf`: one Hub commit with the artifact + its model card.

The file list is decided here (artifact files, never tuneforge's marker), the card is generated from
the run (base model, method, data fingerprint, metrics, parity) unless the artifact already has one.
The token comes from HF_TOKEN / `huggingface-cli login`, never from the config.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.outputs import MARKER
from tuneforge.rundir import RunDir

WHAT = ("adapter", "merged", "gptq", "gguf")
SKIP = {MARKER, "training_args.bin"}


def artifact_dir(run_dir: Path, what: str) -> Path:
    if what == "adapter":
        folder = RunDir(run_dir).final if RunDir(run_dir).exists() else run_dir
        if not (folder / "adapter_config.json").is_file():
            raise UserError(f"{run_dir}: no LoRA adapter to push (a full fine-tune has whole weights: push them with --what merged)")
        return folder
    if what == "merged":
        folder, final = run_dir / "merged", RunDir(run_dir).final
        if not (folder / "config.json").is_file() and (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
            return final  # a full fine-tune's final weights are whole already
        if not (folder / "config.json").is_file():
            raise UserError(f"{run_dir}: no merged model (run `tuneforge merge {run_dir}` first)")
        return folder
    if what == "gptq":
        return one_export(run_dir, sorted(p.parent for p in run_dir.glob("gptq-*/quantize_report.json")), "GPTQ model",
                          f"tuneforge quantize {run_dir} --method gptq")
    return one_export(run_dir, sorted({p.parent for p in run_dir.glob("gguf-*/*.gguf")}), "GGUF export",
                      f"tuneforge export {run_dir} --format gguf")


def one_export(run_dir: Path, folders: list[Path], what: str, command: str) -> Path:
    """The one export folder of its kind in the run (a GGUF or GPTQ folder per type/bits may exist: never guess)."""
    if not folders:
        raise UserError(f"{run_dir}: no {what} (run `{command}` first)")
    if len(folders) > 1:
        raise UserError(f"{run_dir}: several {what}s ({', '.join(f.name for f in folders)}); keep one or push it as a folder")
    return folders[0]


def upload_plan(run_dir: Path, what: str) -> tuple[Path, list[Path], str]:
    """-> (folder, files to upload, README.md text)."""
    from tuneforge.export.card import card_text

    if what not in WHAT:
        raise UserError(f"--what {what}: use one of {', '.join(WHAT)}")
    folder = artifact_dir(run_dir, what)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in SKIP and not p.name.endswith(".tmp"))
    card = folder / "README.md"
    files = [f for f in files if f != card]
    if card.is_file() and "[tuneforge]" in card.read_text():  # ours (merge writes one); peft's boilerplate card is replaced
        return folder, files, card.read_text()
    parity = {}
    for report in ("export_report.json", "merge_report.json", "quantize_report.json"):
        if (folder / report).is_file():
            parity = {k: v for k, v in json.loads((folder / report).read_text()).items() if not isinstance(v, (list, dict))}
    return folder, files, card_text(run_dir, what, parity)


def push(run_dir: str, repo: str, what: str = "adapter", private: bool = False, log=print) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    folder, files, card = upload_plan(Path(run_dir), what)
    if get_token() is None:
        raise UserError("push: no Hugging Face token (set HF_TOKEN in the environment or .env, or run `hf auth login`)")
    api = HfApi()
    ops = [CommitOperationAdd(path_in_repo=str(f.relative_to(folder)), path_or_fileobj=str(f)) for f in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        log(f"uploading {len(ops)} files from {folder} to {repo}")
        commit = api.create_commit(repo, operations=ops, commit_message=f"tuneforge push: {what} from {Path(run_dir).resolve().name}")
    except Exception as exc:  # noqa: BLE001 - network and hub refusals become one line; anything else re-raises
        message = hub_failure(exc, api.endpoint or constants.ENDPOINT, repo)
        if message is None:
            raise
        raise UserError(message) from None
    return {"repo": repo, "url": str(url), "files": sorted(op.path_in_repo for op in ops), "commit": commit.oid}


def hub_failure(exc: BaseException, endpoint: str, repo: str) -> str | None:
    """One line for a push the network or the hub stopped (nothing local is touched by a push), else None."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return f"push: HF_HUB_OFFLINE is set, so nothing can be uploaded to {endpoint} (unset HF_HUB_OFFLINE to push)"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return (f"push: {endpoint} refused the token for {repo} (HTTP {status}) (set HF_TOKEN to a token with write "
                    f"access to {repo.split('/')[0]})")
        first = (str(exc).splitlines() or [""])[0][:200]
        return f"push: {endpoint} answered HTTP {status} for {repo}: {first} (check the repo id and your access, then push again)"
    # huggingface_hub's HTTP client raises its transport's own errors (connection refused, DNS, timeout): matched by
    # their common base name, since that client is huggingface_hub's dependency, not ours.
    if isinstance(exc, OSError) or any(c.__name__ in ("TransportError", "TimeoutException") for c in type(exc).__mro__):
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__
        return (f"push: cannot reach the Hugging Face Hub at {endpoint} ({reason}) (check the network or proxy, or set "
                f"HF_ENDPOINT to a reachable hub; the run is unchanged, push again when it is back)")
    return None
