"""push: exactly these files and this card would be uploaded; the upload is faked at huggingface_hub's HfApi."""

import pytest

from helpers import assert_user_error, run_cli
from test_export_merge import make_run


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)) and f"https://hf.co/{repo_id}")
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: calls.setdefault("ops", list(operations)))
    return calls


def test_push_adapter_and_merged_file_lists_and_card(tmp_path, llama_dir, fake_hub):
    from tuneforge.export.merge import merge
    from tuneforge.export.push import push

    run = make_run(tmp_path / "run", llama_dir)
    r = push(str(run), "me/tiny-lora", "adapter", private=True, log=lambda *_: None)
    assert fake_hub["repo"] == ("me/tiny-lora", {"private": True, "exist_ok": True})
    names = sorted(op.path_in_repo for op in fake_hub["ops"])
    assert names == r["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
                                   "tokenizer_config.json"]
    card = next(op for op in fake_hub["ops"] if op.path_in_repo == "README.md").path_or_fileobj.decode()
    assert f"base_model: {llama_dir}" in card and "0123456789abcdef" in card and "| method | lora |" in card

    fake_hub.clear()
    merge(str(run), log=lambda *_: None)
    push(str(run), "me/tiny-merged", "merged", log=lambda *_: None)
    names = {op.path_in_repo for op in fake_hub["ops"]}
    assert {"config.json", "model.safetensors", "generation_config.json", "merge_report.json", "README.md"} <= names
    assert ".tuneforge.json" not in names and not any("adapter" in n for n in names)


def test_push_errors_are_one_line(tmp_path, llama_dir):
    run = make_run(tmp_path / "run", llama_dir)
    assert_user_error(run_cli("push", run, "--repo", "me/x", "--what", "gguf", env={"HF_TOKEN": "hf_fake"}), "no GGUF export")
    assert_user_error(run_cli("push", run, "--repo", "me/x", "--what", "merged", env={"HF_TOKEN": "hf_fake"}), "tuneforge merge")
    for folder in ("gguf-f16", "gguf-q8_0"):  # two exports of one kind: which to push is the user's call, not a guess
        (run / folder).mkdir()
        (run / folder / f"run-{folder}.gguf").write_bytes(b"GGUF")
    assert_user_error(run_cli("push", run, "--repo", "me/x", "--what", "gguf", env={"HF_TOKEN": "hf_fake"}),
                      "several GGUF exports (gguf-f16, gguf-q8_0)")
