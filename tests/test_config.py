import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import assert_user_error, run_cli
from tuneforge.config import load_config
from tuneforge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(REPO.glob("examples/**/*.yaml"))


def minimal(tmp_path: Path, **extra) -> Path:
    cfg = {"model": {"path": "org/model"}, "data": {"train": [{"path": "t.jsonl"}]}, **extra}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.data.train


def test_examples_exist():
    assert len(EXAMPLES) >= 2


def test_misspelled_key_suggests_closest(tmp_path):
    p = minimal(tmp_path, train={"learning_rat": 1})
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rat'"):
        load_config(p)
    proc = run_cli("config", "validate", minimal(tmp_path, train={"lrr": 1}))
    assert_user_error(proc, "train.lrr", "did you mean 'train.lr'")


def test_misspelled_key_inside_list_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"path": "x/y"}, "data": {"train": [{"pth": "a.jsonl"}]}}))
    with pytest.raises(UserError, match=r"did you mean 'data.train.0.path'"):
        load_config(p)


def test_bad_value_names_key_and_allowed_values(tmp_path):
    proc = run_cli("config", "validate", minimal(tmp_path, train={"lr_scheduler": "cosin"}))
    assert_user_error(proc, "train.lr_scheduler", "'cosine'", "'linear'", "'constant'", "cosin")


def test_impossible_combination_fails_before_loading(tmp_path):
    p = minimal(tmp_path, data={"train": [{"path": "t.jsonl"}], "eval_split": 0.0}, train={"eval_every": 5})
    with pytest.raises(UserError, match="eval_every needs eval data"):
        load_config(p)


def test_set_overrides_and_show(tmp_path):
    proc = run_cli("config", "show", minimal(tmp_path), "--set", "train.lr=3e-5", "--set", "lora.target_modules=[q_proj,v_proj]")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["lr"] == 3e-5
    assert shown["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert shown["train"]["lr_scheduler"] == "cosine"  # defaults are filled in
    assert shown["data"]["train_on"] == "assistant"


def test_schema_is_json_with_descriptions():
    proc = run_cli("config", "schema")
    schema = json.loads(proc.stdout)
    lr = schema["$defs"]["TrainConfig"]["properties"]["lr"]
    assert lr["description"] and lr["default"] == 2e-4


def test_json_config_and_missing_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"path": "a/b"}, "data": {"train": [{"path": "x.jsonl"}]}}))
    assert load_config(p).model.path == "a/b"
    assert_user_error(run_cli("config", "validate", tmp_path / "nope.yaml"), "config file not found")


def test_secrets_come_from_dotenv_not_config(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / ".env").write_text("HF_TOKEN=hf_secret_value\n")
    cfg = load_config(minimal(tmp_path))
    import os

    assert os.environ["HF_TOKEN"] == "hf_secret_value"
    assert "hf_secret_value" not in yaml.safe_dump(cfg.model_dump(mode="json"))


def test_help_imports_no_torch():
    code = "import sys; from tuneforge.cli import app; import tuneforge.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    assert run_cli("--help").returncode == 0


def test_packing_errors_are_one_line(tmp_path):
    cfg = minimal(tmp_path)
    assert_user_error(run_cli("config", "validate", cfg, "--set", "data.packing=bins", "--set", "data.pack_length=100"),
                      "data.pack_length (100) must hold the longest sample (max_length = 1024)")
    assert_user_error(run_cli("config", "validate", cfg, "--set", "data.packing=bin"), "data.packing", "'bins'")


@pytest.mark.parametrize("extra", [
    {"train": {"finetune": "full"}},
    {"train": {"finetune": "freeze", "freeze": {"layers": 1}}},
    {"train": {"lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.2, "warmup_steps": 2}},
    {"train": {"micro_batch_tokens": 2048, "optimizer": "lion"}},
    {"data": {"eval_size": 3}},
    {"data": {"train": [{"path": "a.jsonl", "samples": 5}]}},
])
def test_a_saved_run_config_validates_again(extra):
    """config.yaml in a run dir spells out every default; resume, eval and the job server reload it."""
    from tuneforge.config.schema import Config

    raw = {"model": {"path": "m"}, "data": {"train": [{"path": "a.jsonl"}]}}
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    cfg = Config.model_validate(raw)
    again = Config.model_validate(cfg.model_dump(mode="json"))
    assert again.model_dump() == cfg.model_dump()


def test_env_vars_expand_in_every_marked_path(tmp_path, monkeypatch):
    """`${VAR}` expands in each path the schema marks (lora.init_from, export.quantize.calibration), not a hand list."""
    monkeypatch.setenv("TF_TEST_ROOT", str(tmp_path))
    cfg = load_config(minimal(tmp_path, lora={"init_from": "${TF_TEST_ROOT}/adapter"},
                              export={"quantize": {"calibration": "${TF_TEST_ROOT}/calib.jsonl"}}))
    assert cfg.lora.init_from == f"{tmp_path}/adapter"
    assert cfg.export.quantize.calibration == f"{tmp_path}/calib.jsonl"
