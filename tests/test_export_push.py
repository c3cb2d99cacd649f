"""push: `tuneforge push` against a local Hub at the HTTP boundary (tests/fake_hub.py): the files that arrive are
byte-identical to the run's, with the card; the token travels only in the Authorization header; a hub that cannot be
reached or refuses the token is one line, exit 2."""

import socket

from helpers import assert_user_error, run_cli
from test_export_merge import make_run


def test_push_adapter_and_merged_arrive_byte_identical(tmp_path, llama_dir, fake_hub):
    from tuneforge.export.merge import merge

    run = make_run(tmp_path / "run", llama_dir)
    proc = run_cli("push", run, "--repo", "me/tiny-lora", "--private", env=fake_hub.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    pushed = fake_hub.files("me/tiny-lora")
    assert sorted(pushed) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
                              "tokenizer_config.json"]
    for name in set(pushed) - {"README.md"}:
        assert pushed[name] == (run / "final" / name).read_bytes(), name
    card = pushed["README.md"].decode()
    assert f"base_model: {llama_dir}" in card and "0123456789abcdef" in card and "| method | lora |" in card
    assert fake_hub.repos[("model", "me/tiny-lora")] == {"private": True, "commits": ["tuneforge push: adapter from run"]}
    assert fake_hub.authorizations() == {f"Bearer {fake_hub.token}"}  # every call carried the token, and only it

    merge(str(run), log=lambda *_: None)
    proc = run_cli("push", run, "--repo", "me/tiny-merged", "--what", "merged", env=fake_hub.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    pushed = fake_hub.files("me/tiny-merged")
    assert {"config.json", "model.safetensors", "generation_config.json", "merge_report.json", "README.md"} <= set(pushed)
    assert ".tuneforge.json" not in pushed and not any("adapter" in n for n in pushed)
    assert pushed["model.safetensors"] == (run / "merged" / "model.safetensors").read_bytes()
    assert not fake_hub.repos[("model", "me/tiny-merged")]["private"]  # the CLI's default: public unless --private
    assert fake_hub.token not in "".join(p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file())


def test_unreachable_hub_and_refused_token_are_one_line(tmp_path, llama_dir, fake_hub):
    run = make_run(tmp_path / "run", llama_dir)
    with socket.socket() as s:  # a port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = run_cli("push", run, "--repo", "me/x", env={**fake_hub.env(), "HF_ENDPOINT": dead})
    assert_user_error(proc, f"cannot reach the Hugging Face Hub at {dead}", "HF_ENDPOINT")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written, nothing lost

    assert_user_error(run_cli("push", run, "--repo", "me/x", env=fake_hub.env(token="hf_wrong")),
                      f"{fake_hub.url} refused the token for me/x (HTTP 401)", "HF_TOKEN")
    assert_user_error(run_cli("push", run, "--repo", "me/x", env={**fake_hub.env(), "HF_HUB_OFFLINE": "1"}), "unset HF_HUB_OFFLINE")
    assert not fake_hub.files("me/x") and ("model", "me/x") not in fake_hub.repos


def test_push_errors_are_one_line(tmp_path, llama_dir):
    run = make_run(tmp_path / "run", llama_dir)
    assert_user_error(run_cli("push", run, "--repo", "me/x", "--what", "gguf", env={"HF_TOKEN": "hf_fake"}), "no GGUF export")
    assert_user_error(run_cli("push", run, "--repo", "me/x", "--what", "merged", env={"HF_TOKEN": "hf_fake"}), "tuneforge merge")
    for folder in ("gguf-f16", "gguf-q8_0"):  # two exports of one kind: which to push is the user's call, not a guess
        (run / folder).mkdir()
        (run / folder / f"run-{folder}.gguf").write_bytes(b"GGUF")
    assert_user_error(run_cli("push", run, "--repo", "me/x", "--what", "gguf", env={"HF_TOKEN": "hf_fake"}),
                      "several GGUF exports (gguf-f16, gguf-q8_0)")

