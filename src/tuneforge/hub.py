"""One commit of local files to a Hugging Face Hub repo, with every way it can fail said in one line.

Shared by `tuneforge push` (a model), the push after training (`export.hub_repo`) and `tuneforge prepare --push-to`
(a dataset), so the three say the same thing about the same failure. The token comes from HF_TOKEN /
`hf auth login`, never from a config or a file tuneforge writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

from tuneforge.errors import UserError

TOKEN_FIX = "set HF_TOKEN in the environment or .env, or run `hf auth login`"


def check_ready(place: str, repo: str, drop: str = "") -> None:
    """Before any work: `repo` is a repo id, the hub is not switched off, there is a token. `place` names what asked
    for the push (an option, a config field); `drop` is the other way out (", or remove export.hub_repo")."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise UserError(f"{place}: {repo!r} is not a Hub repo id ({str(exc).splitlines()[0][:160]}) (write OWNER/NAME)") from None
    if constants.is_offline_mode():
        raise UserError(f"{place}: HF_HUB_OFFLINE is set, so nothing can be pushed to {repo} (unset HF_HUB_OFFLINE{drop})")
    if get_token() is None:
        raise UserError(f"{place}: no Hugging Face token to push to {repo} ({TOKEN_FIX}{drop})")


def upload(place: str, repo: str, source: Path, files: dict[str, Union[Path, bytes]], message: str, kept: str,
           repo_type: str = "model", private: bool = False, log: Callable[[str], None] = print) -> dict:
    """files (from the folder `source`): {path in the repo: local file or bytes} -> one commit (the repo is created if missing).
    A hub or network failure is a UserError naming `place`, ending with `kept` (what is safe locally)."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    api = HfApi()
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
           for name, src in files.items()]
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        log(f"uploading {len(ops)} files from {source} to the {repo_type} repo {repo}")
        commit = api.create_commit(repo, repo_type=repo_type, operations=ops, commit_message=message)
    except Exception as exc:  # noqa: BLE001 - network and hub refusals become one line; anything else re-raises
        failure = _failure(exc, api.endpoint or constants.ENDPOINT, repo)
        if failure is None:
            raise
        raise UserError(f"{place}: {failure[0]} ({failure[1]}; {kept})") from None
    return {"repo": repo, "url": str(url), "files": sorted(files), "commit": commit.oid}


def _failure(exc: BaseException, endpoint: str, repo: str) -> tuple[str, str] | None:
    """(what happened, the fix) for a push the network or the hub stopped, else None (a bug keeps its traceback)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so nothing can be pushed to {endpoint}", "unset HF_HUB_OFFLINE to push"
    first = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return (f"{endpoint} refused the token for {repo} (HTTP {status})",
                    f"set HF_TOKEN to a token with write access to {repo.split('/')[0]}")
        return f"{endpoint} answered HTTP {status} for {repo}: {first}", "check the repo id and your access"
    # huggingface_hub's HTTP client raises its transport's own errors (connection refused, DNS, timeout): matched by
    # their common base name, since that client is huggingface_hub's dependency, not ours.
    if isinstance(exc, OSError) or any(c.__name__ in ("TransportError", "TimeoutException") for c in type(exc).__mro__):
        return (f"cannot reach the Hugging Face Hub at {endpoint} ({first})",
                "check the network or proxy, or set HF_ENDPOINT to a reachable hub")
    return None
