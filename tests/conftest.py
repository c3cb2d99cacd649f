import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> Path:
    """A full fine-tune (Llama, hidden 256: k-quant rows) that learned the task format, as `train` writes it.
    Quantized exports of a random model disagree on greedy answers by chance; this one answers with confidence."""
    import subprocess

    from helpers import run_cli, write_config

    tmp = tmp_path_factory.mktemp("learned")
    base = tiny.build_model(tmp / "base", "llama", hidden=256)
    data = tiny.write_jsonl(tmp / "train.jsonl", tiny.reverse_rows(80, seed=3))
    cfg = write_config(tmp / "c.yaml", base, data, tmp / "run", data={"eval_split": 0.1},
                       train={"finetune": "full", "max_steps": 80, "micro_batch_size": 8, "lr": 2e-3,
                              "generate_eval": {"samples": 3, "max_new_tokens": 8}})  # held-out prompts for parity checks
    proc: subprocess.CompletedProcess = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run"


@pytest.fixture(scope="session")
def tokenizer(llama_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(llama_dir)


@pytest.fixture
def fake_hub(tmp_path):
    """A local Hugging Face Hub (tests/fake_hub.py); give child processes `fake_hub.env()`."""
    from fake_hub import FakeHub

    with FakeHub(tmp_path / "hub") as hub:
        yield hub


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "tfhome"))
