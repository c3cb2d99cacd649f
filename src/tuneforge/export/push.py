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
    from tuneforge.hub import check_ready, upload

    folder, files, card = upload_plan(Path(run_dir), what)
    check_ready("push", repo)
    contents: dict = {str(f.relative_to(folder)): f for f in files}
    contents["README.md"] = card.encode("utf-8")
    return upload("push", repo, folder, contents, f"tuneforge push: {what} from {Path(run_dir).resolve().name}",
                  "the run is unchanged; push again when it is fixed", private=private, log=log)
