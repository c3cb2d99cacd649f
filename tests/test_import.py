"""`tuneforge config import`: every example config/request in the seeds, verbatim, key by key."""

import json
from pathlib import Path

import pytest
import yaml

from helpers import assert_user_error, run_cli_inprocess
from tuneforge.config.importers import import_file, translate
from tuneforge.config.importers.table import MAPPED, NOT_MAPPED, SECRET, Translator, schema_has, to
from tuneforge.config.schema import Config
from tuneforge.errors import UserError

DATA = Path(__file__).parent / "data"
REQUEST = json.loads((DATA / "seeds_001_request.json").read_text())
XLLM = yaml.safe_load((DATA / "seeds_000_xllm_defaults.yaml").read_text())
LF_TRAIN = sorted(DATA.glob("seeds_004_sft_*.sh"))


def rows_by_key(result):
    keys = [r.key for r in result.rows]
    assert len(keys) == len(set(keys)), "a key reported twice"
    return {r.key: r for r in result.rows}


def assert_complete(result, source_keys):
    rows = rows_by_key(result)
    assert set(source_keys) <= set(rows), f"keys dropped silently: {set(source_keys) - set(rows)}"
    for r in result.rows:
        assert r.status in ("mapped", "ignored", "secret", "not mapped")
        if r.status != MAPPED:
            assert r.note, f"{r.key}: {r.status} without a reason"
    Config.model_validate(result.config)  # the output is a valid tuneforge config


def test_seed_request_args_every_key_accounted_for():
    args = REQUEST["input"]["args"]
    result = import_file(DATA / "seeds_001_request.json", "axolotl")
    keys = [k for k in args if k != "datasets"] + [f"datasets[0].{k}" for k in args["datasets"][0]]
    assert_complete(result, keys)
    cfg = Config.model_validate(result.config)
    assert cfg.model.path == "NousResearch/Llama-3.2-1B" and cfg.model.pad_token == "<|end_of_text|>"
    assert cfg.data.train[0].path == "teknium/GPT4-LLM-Cleaned" and cfg.data.train[0].format == "alpaca"
    assert cfg.data.max_length == 2048 and cfg.data.packing == "bins" and cfg.data.eval_split == pytest.approx(0.1)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05) and "o_proj" in cfg.lora.target_modules
    assert (cfg.train.grad_accum, cfg.train.micro_batch_size, cfg.train.epochs, cfg.train.lr) == (2, 2, 1, 2e-4)
    assert cfg.train.warmup_steps == 10 and cfg.train.gradient_checkpointing and cfg.data.train_on == "assistant"
    assert cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.output.dir == "./outputs/lora-out"
    rows = rows_by_key(result)
    for key in ("loss_watchdog_threshold", "wandb_project", "optimizer", "hub_model_id", "evals_per_epoch"):
        # mapped when tuneforge has the feature, otherwise reported with the reason: never dropped
        assert rows[key].status == MAPPED or "not supported yet" in rows[key].note or "not accepted" in rows[key].note, rows[key]
    if schema_has("train.loss_watchdog_threshold"):
        assert cfg.train.loss_watchdog_threshold == 5 and cfg.train.loss_watchdog_patience == 3


def test_seed_dataset_block_keys_reported():
    datasets = yaml.safe_load((DATA / "seeds_001_datasets.yaml").read_text())["datasets"]
    args = {**REQUEST["input"]["args"], "datasets": datasets}
    result = translate(args, "axolotl")
    rows = rows_by_key(result)
    for key in datasets[0]:
        assert f"datasets[0].{key}" in rows
    # `path` is a hub id and data_files a second source: data_files is reported, not silently used or dropped
    assert rows["datasets[0].type"].status == MAPPED and rows["datasets[0].train_on_split"].targets == ["data.train.0.split"]
    assert rows["datasets[0].ds_type"].status == "ignored"
    assert rows["datasets[0].data_files"].status == NOT_MAPPED
    Config.model_validate(result.config)


def test_xllm_every_documented_key():
    result = import_file(DATA / "seeds_000_xllm_defaults.yaml", "xllm")
    assert_complete(result, XLLM)
    cfg = Config.model_validate(result.config)
    assert cfg.model.path == "mistralai/Mistral-7B-v0.1" and cfg.data.train[0].path == "./train.jsonl"
    assert cfg.train.finetune == "full"  # apply_lora: False
    assert cfg.train.micro_batch_size == 2 and cfg.train.warmup_steps == 1000 and cfg.train.weight_decay == 0.001
    assert cfg.data.max_length == 2048 and cfg.data.max_eval_samples == 1000 and cfg.train.keep_checkpoints == 1


def test_xllm_lora_and_secrets_never_in_config():
    src = {**XLLM, "apply_lora": True, "raw_lora_target_modules": "q_proj,v_proj", "lora_rank": 4,
           "huggingface_hub_token": "hf_PLANTED_SECRET", "wandb_api_key": "wandb-PLANTED", "report_to_wandb": True,
           "wandb_project": "p1"}
    result = translate(src, "xllm")
    rows = rows_by_key(result)
    assert rows["huggingface_hub_token"].status == SECRET and result.env["HF_TOKEN"] == "hf_PLANTED_SECRET"
    assert result.env["WANDB_API_KEY"] == "wandb-PLANTED"
    dumped = yaml.safe_dump(result.config) + json.dumps(result.report())
    assert "PLANTED" not in dumped
    cfg = Config.model_validate(result.config)
    assert cfg.train.finetune == "lora" and cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("path", LF_TRAIN, ids=lambda p: p.stem)
def test_llamafactory_seed_commands(path):
    result = import_file(path, "llamafactory")
    text = path.read_text()
    flags = [tok[2:] for tok in text.split() if tok.startswith("--")]
    keys = {r.key.split("[")[0] for r in result.rows}
    assert set(flags) <= keys, set(flags) - keys
    assert_complete(result, [])
    cfg = Config.model_validate(result.config)
    assert cfg.train.finetune == "lora" and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.grad_accum == 4 and cfg.train.lr == 2e-5 and cfg.train.epochs == 2.0
    assert cfg.model.chat_template in ("llama2", "mistral") and cfg.train.mixed_precision == "bf16"
    rows = rows_by_key(result)
    assert rows["quantization_bit"].status == MAPPED or "not supported yet" in rows["quantization_bit"].note


@pytest.mark.parametrize("name,needle", [("predict_llama2", "tuneforge generate"), ("export_mixtral", "tuneforge merge")])
def test_llamafactory_predict_and_export_commands_point_to_tuneforge(name, needle):
    with pytest.raises(UserError, match=needle):
        import_file(DATA / f"seeds_004_{name}.sh", "llamafactory")


def test_unknown_and_unsupported_keys_are_reported_not_dropped():
    result = translate({**REQUEST["input"]["args"], "some_future_axolotl_key": 3}, "axolotl")
    row = rows_by_key(result)["some_future_axolotl_key"]
    assert row.status == NOT_MAPPED and "unknown axolotl key" in row.note
    t = Translator("x")
    t.apply("k", 1, to("train.no_such_feature"), "")
    assert t.rows[0].status == NOT_MAPPED and "not supported yet" in t.rows[0].note and t.cfg == {}


def test_rejected_value_becomes_not_mapped_with_schema_reason():
    result = translate({**REQUEST["input"]["args"], "lr_scheduler": "one_cycle_weird"}, "axolotl")
    row = rows_by_key(result)["lr_scheduler"]
    assert row.status == NOT_MAPPED and "not accepted" in row.note
    Config.model_validate(result.config)


def test_missing_model_is_one_clear_error():
    with pytest.raises(UserError, match="base_model"):
        translate({"datasets": [{"path": "a.jsonl"}]}, "axolotl")


def test_cli_import_writes_a_config_the_loader_accepts(tmp_path, llama_dir):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"instruction": "hi", "input": "", "output": "yo"}) + "\n")
    args = {**REQUEST["input"]["args"], "base_model": str(llama_dir), "datasets": [{"path": str(train), "type": "alpaca"}],
            "hf_token": "hf_CLI_SECRET"}
    src = tmp_path / "axolotl.yaml"
    src.write_text(yaml.safe_dump(args))
    out = tmp_path / "tf" / "tuneforge.yaml"
    proc = run_cli_inprocess("config", "import", src, "--from", "axolotl", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "not mapped" in proc.stderr and "lora_r" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert "hf_CLI_SECRET" not in out.read_text() + proc.stderr + proc.stdout
    ok = run_cli_inprocess("config", "validate", out)
    assert ok.returncode == 0, ok.stderr
    bad = run_cli_inprocess("config", "import", src, "--from", "nope")
    assert_user_error(bad, "--from")


def test_methods_and_engines_map_to_the_schema_keys():
    lf = translate({"model_name_or_path": "m", "dataset": "a.json", "finetuning_type": "freeze", "stage": "dpo",
                    "pref_beta": 0.2, "neftune_noise_alpha": 5, "deepspeed": "ds_z3.json"}, "llamafactory")
    # QLoRA is LoRA-only in tuneforge: with freeze the quantization is reported, not silently applied
    q = translate({"model_name_or_path": "m", "dataset": "a.json", "finetuning_type": "freeze", "quantization_bit": 4}, "llamafactory")
    assert rows_by_key(q)["quantization_bit"].status == NOT_MAPPED and "LoRA" in rows_by_key(q)["quantization_bit"].note
    cfg = Config.model_validate(lf.config)
    assert cfg.train.finetune == "freeze" and cfg.train.freeze.layers == 2 and cfg.train.method == "dpo"
    assert cfg.preference.beta == 0.2 and cfg.train.neftune_alpha == 5 and cfg.model.quantize is None
    assert cfg.train.deepspeed == "ds_z3.json"
    ax = translate({**REQUEST["input"]["args"], "fsdp": ["full_shard"], "flash_attention": False,
                    "torch_compile": True, "tf32": True}, "axolotl")
    cfg = Config.model_validate(ax.config)
    assert cfg.train.fsdp and cfg.train.compile and cfg.train.tf32
    ql = translate({**REQUEST["input"]["args"], "adapter": "qlora", "fsdp": ["full_shard"]}, "axolotl")
    assert Config.model_validate(ql.config).model.quantize == "4bit"
    assert rows_by_key(ql)["fsdp"].status == NOT_MAPPED and "not accepted" in rows_by_key(ql)["fsdp"].note  # 4-bit is not sharded
    assert cfg.train.optimizer == "adamw_8bit"
    xl = translate({**XLLM, "deepspeed_stage": 3, "apply_lora": True}, "xllm")
    assert Config.model_validate(xl.config).train.deepspeed == "zero3"
    xl = translate({**XLLM, "load_in_4bit": True, "apply_lora": True}, "xllm")
    cfg = Config.model_validate(xl.config)
    assert cfg.model.quantize == "4bit" and cfg.model.quant_type == "nf4" and cfg.model.double_quant
