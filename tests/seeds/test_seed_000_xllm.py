"""Seed 000 (X—LLM): the user's own X—LLM config and registered dataset -> `config import` -> `train`, which fuses the
LoRA and pushes the fused model (X—LLM's fuse_after_training + push_to_hub), checked at a faked hub's HTTP boundary.

The config is the seed's config reference, every key at its documented default (tests/data/seeds_000_xllm_defaults.yaml),
plus the keys an X—LLM user sets for this workflow. Only what cannot run here is swapped: the hub model id for the
local tiny model, and a step budget that fits CI.
"""

import json
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, run_cli_inprocess

DATA = Path(__file__).parents[1] / "data"
DATASET_NAME = "xllm-demo-rows"

# The user's X—LLM project: a dataset implemented in their own package and registered by name. tuneforge finds a
# name through the package's entry point (what installing it with `pip install -e .` writes).
USER_DATASET = '''
import random


def get_data(options):
    rng = random.Random(0)
    for _ in range(40):
        letters = [rng.choice("abcdefghij") for _ in range(rng.randint(2, 5))]
        yield {"messages": [{"role": "user", "content": "reverse the letters: " + " ".join(letters)},
                            {"role": "assistant", "content": " ".join(reversed(letters))}]}
'''


def install_user_package(site: Path) -> Path:
    info = site / "xllm_user_data-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "xllm_user_data.py").write_text(USER_DATASET)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xllm-user-data\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[tuneforge.datasets]\n{DATASET_NAME} = xllm_user_data:get_data\n")
    return site


@pytest.mark.slow
def test_xllm_config_trains_fuses_and_pushes(tmp_path, llama_dir, fake_hub):
    site = install_user_package(tmp_path / "site")
    xllm = yaml.safe_load((DATA / "seeds_000_xllm_defaults.yaml").read_text())
    xllm.update(
        model_name_or_path=str(llama_dir),  # hub id -> the local tiny model
        dataset_key=DATASET_NAME,  # the user's registered dataset (X—LLM's own default, soda, is its built-in)
        apply_lora=True, raw_lora_target_modules="all", lora_rank=8,
        fuse_after_training=True, push_to_hub=True, hub_model_id="tester/xllm-fused",
        max_length=128, per_device_train_batch_size=4, max_steps=3, warmup_steps=0, learning_rate=1e-3,
        output_dir=str(tmp_path / "outputs"),
    )
    src = tmp_path / "xllm.yaml"
    src.write_text(yaml.safe_dump(xllm))
    cfg_path = tmp_path / "tuneforge.yaml"

    imported = run_cli_inprocess("config", "import", src, "--from", "xllm", "--out", cfg_path)
    assert imported.returncode == 0, imported.stderr[-3000:]  # every key of the reference accounted for, none left out
    cfg = yaml.safe_load(cfg_path.read_text())
    assert cfg["data"]["train"] == [{"custom": DATASET_NAME}]
    assert cfg["export"] == {"merge": True, "hub_repo": "tester/xllm-fused", "hub_private": True}
    assert cfg["lora"]["r"] == 8 and cfg["train"]["finetune"] == "lora" and cfg["train"]["max_steps"] == 3

    proc = run_cli("train", cfg_path, cwd=tmp_path, env={**fake_hub.env(), "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs"
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished"
    assert {k: v["status"] for k, v in info["export"].items()} == {"merge": "done", "push": "done"}
    assert info["export"]["push"]["what"] == "merged"

    # the pushed repo holds the fused model, byte for byte, and was created private (X—LLM's hub_private_repo default)
    pushed = fake_hub.files("tester/xllm-fused")
    merged = {p.relative_to(run / "merged").as_posix(): p.read_bytes() for p in (run / "merged").rglob("*") if p.is_file()}
    weights = [name for name in merged if name.endswith(".safetensors")]
    assert weights and "config.json" in merged and "adapter_config.json" not in pushed
    for name in [*weights, "config.json", "tokenizer.json"]:
        assert pushed[name] == merged[name], name
    assert fake_hub.repos[("model", "tester/xllm-fused")]["private"] is True
