"""`tuneforge config import`: every example config/request in the seeds, verbatim, key by key."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from helpers import assert_user_error, run_cli_inprocess
from tuneforge.config.importers import import_file, translate
from tuneforge.config.importers.table import MAPPED, NOT_MAPPED, SECRET, Translator, looks_secret, schema_has, to
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
        assert r.status in ("mapped", "ignored", "secret", "not mapped", "source default")
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
    # flash-attn where it can run, else "the best attention available here" (the job would fail on flash_attention_2)
    assert cfg.model.attn_implementation == ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "auto")
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
    # dataset_key names a registered dataset (X—LLM's download step only writes its rows to train_local_path_to_data)
    assert cfg.model.path == "mistralai/Mistral-7B-v0.1" and cfg.data.train[0].custom == "soda"
    assert rows_by_key(result)["train_local_path_to_data"].status == "ignored"
    assert result.left_out() == [], [r.key for r in result.left_out()]  # every key at its default imports cleanly
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
            "hf_token": "hf_CLI_SECRET", "lr_quadratic_warmup": True}
    src = tmp_path / "axolotl.yaml"
    src.write_text(yaml.safe_dump(args))
    out = tmp_path / "tf" / "tuneforge.yaml"
    refused = run_cli_inprocess("config", "import", src, "--from", "axolotl", "--out", out)
    assert_user_error(refused, "lr_quadratic_warmup", "--allow-partial")  # a key left out: exit 2, nothing written
    assert not out.exists() and "hf_CLI_SECRET" not in refused.stderr + refused.stdout
    proc = run_cli_inprocess("config", "import", src, "--from", "axolotl", "--out", out, "--allow-partial")
    assert proc.returncode == 0, proc.stderr
    listed = " ".join(proc.stderr.split()).split("--allow-partial: left out ")[1]
    assert "lr_quadratic_warmup" in listed.split("(reasons")[0]
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


# --- issue 21: each key judged on its own -------------------------------------------------------------------------


def test_one_refused_key_does_not_cascade_to_its_section():
    # revision_of_model is refused for a local model; the model keys beside it must still be carried over (the old
    # importer demoted quantize/device_map/chat_template/tokens too and the config silently became plain LoRA).
    args = {**REQUEST["input"]["args"], "base_model": "./local-model", "revision_of_model": "main", "adapter": "qlora",
            "load_in_4bit": True, "device_map": "auto", "chat_template": "chatml", "tokens": ["<tool>"]}
    result = translate(args, "axolotl")
    rows = rows_by_key(result)
    assert rows["revision_of_model"].status == NOT_MAPPED and "hub ids only" in rows["revision_of_model"].note
    for key in ("adapter", "load_in_4bit", "device_map", "chat_template", "tokens"):
        assert rows[key].status == MAPPED, rows[key]
    cfg = Config.model_validate(result.config)
    assert (cfg.model.quantize, cfg.model.device_map, cfg.model.chat_template, cfg.model.add_tokens) == ("4bit", "auto", "chatml", ["<tool>"])
    assert cfg.train.finetune == "lora" and cfg.model.revision is None


def test_full_finetune_leaves_xllm_lora_keys_unused_instead_of_refusing_apply_lora():
    result = translate({**XLLM, "apply_lora": False, "lora_rank": 64}, "xllm")
    rows = rows_by_key(result)
    assert rows["apply_lora"].status == MAPPED and rows["lora_rank"].status == "ignored"
    assert Config.model_validate(result.config).train.finetune == "full"


@pytest.mark.parametrize("name,expected", [
    ("adamw_torch_fused", "adamw"), ("adamw_torch", "adamw"), ("adamw_hf", "adamw"), ("adamw_apex_fused", "adamw"),
    ("adamw_bnb_8bit", "adamw_8bit"), ("paged_adamw_8bit", "paged_adamw_8bit"), ("paged_adamw_32bit", "adamw"),
    ("lion_8bit", "lion_8bit"), ("lion_32bit", "lion"), ("adafactor", "adafactor"), ("sgd", "sgd"), ("adagrad", "adagrad"),
])
def test_hf_optimizer_names_map_to_schema_values(name, expected):
    for source, args in (("axolotl", {**REQUEST["input"]["args"], "optimizer": name}), ("xllm", {**XLLM, "optim": name}),
                         ("llamafactory", {"model_name_or_path": "m", "dataset": "a.json", "optim": name})):
        result = translate(args, source)
        row = rows_by_key(result)["optimizer" if source == "axolotl" else "optim"]
        assert row.status == MAPPED, (source, row)
        assert Config.model_validate(result.config).train.optimizer == expected


def test_unknown_optimizer_is_refused_with_the_known_names():
    row = rows_by_key(translate({**XLLM, "optim": "adamw_anyprecision"}, "xllm"))["optim"]
    assert row.status == NOT_MAPPED and "adamw_torch_fused" in row.note


@pytest.mark.parametrize("source,args,typo,guess", [
    ("axolotl", REQUEST["input"]["args"], "lora_rank", "lora_r"),
    ("axolotl", REQUEST["input"]["args"], "learning_rat", "learning_rate"),
    ("xllm", XLLM, "lora_r", "lora_rank"),
    ("xllm", XLLM, "fuse_after_train", "fuse_after_training"),
    ("llamafactory", {"model_name_or_path": "m", "dataset": "a.json"}, "lora_ranks", "lora_rank"),
])
def test_unknown_key_gets_a_did_you_mean_from_the_source_tools_keys(source, args, typo, guess):
    row = rows_by_key(translate({**args, typo: 1}, source))[typo]
    assert row.status == NOT_MAPPED and f"did you mean {guess!r}" in row.note, row.note


def test_unknown_dataset_option_did_you_mean():
    args = {**REQUEST["input"]["args"], "datasets": [{"path": "a.jsonl", "typ": "alpaca"}]}
    row = rows_by_key(translate(args, "axolotl"))["datasets[0].typ"]
    assert row.status == NOT_MAPPED and "did you mean 'type'" in row.note


# --- issue 20 class 6: secrets in keys the importer does not know ---------------------------------------------------

PLANTED = {"hub_token": "hf_PLANT_A", "hf_use_auth_token": "hf_PLANT_B", "my_service_password": "PLANT_C",
           "wandb_api_key": "PLANT_D", "fsdp_config": {"limit_all_gathers": True, "auth_token": "PLANT_E"}}


def _planted_args():
    return {**REQUEST["input"]["args"], **PLANTED,
            "datasets": [{"path": "org/private-set", "type": "alpaca", "token": "hf_PLANT_A"}]}


def test_credential_named_keys_at_any_depth_never_reach_report_or_config():
    result = translate(_planted_args(), "axolotl")
    rows = rows_by_key(result)
    stored = json.dumps(result.report()) + yaml.safe_dump(result.config) + repr([r.value for r in result.rows])
    assert "PLANT" not in stored
    for key in ("hub_token", "hf_use_auth_token", "my_service_password", "wandb_api_key", "fsdp_config.auth_token",
                "datasets[0].token"):
        assert rows[key].status == SECRET and rows[key].value == "***", rows[key]
    assert result.env == {"HF_TOKEN": "hf_PLANT_A", "WANDB_API_KEY": "PLANT_D"}  # the rest is dropped, never kept
    assert "different $HF_TOKEN" in rows["hf_use_auth_token"].note and "dropped" in rows["my_service_password"].note
    assert rows["fsdp_config"].value == {"limit_all_gathers": True, "auth_token": "***"}


def test_job_server_import_report_holds_no_secret(tmp_path):
    # the server stores JobSpec.report in its database and returns it from GET /v1/jobs/ID
    from tuneforge.serve.schema import parse_request

    args = {**_planted_args(), "base_model": str(tmp_path), "datasets": [{"path": str(tmp_path / "d.jsonl"), "token": "hf_PLANT_A"}]}
    spec = parse_request({"input": {"args": args, "credentials": {"wandb_api_key": "PLANT_D"}}}, "alice")
    assert "PLANT" not in json.dumps(spec.report) + json.dumps(spec.config)
    assert spec.credentials["HF_TOKEN"] == "hf_PLANT_A" and spec.credentials["WANDB_API_KEY"] == "PLANT_D"


@pytest.mark.parametrize("name", ["hub_token", "hf_token", "token", "hf_use_auth_token", "use_auth_token", "wandb_api_key",
                                  "huggingface_hub_token", "api_key", "secret", "db_password", "accessToken", "ms_hub_token"])
def test_credential_names(name):
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["pad_token", "eos_token", "special_tokens", "tokens", "tokenizer_name_or_path",
                                  "dataset_key", "experiment_key", "collator_key", "push_to_hub_bos_add_bos_token",
                                  "pad_token_id", "max_new_tokens", "add_special_tokens", "dataset_keep_in_memory"])
def test_not_credential_names(name):
    assert not looks_secret(name)


def test_every_known_credential_key_is_handled_as_a_secret():
    from tuneforge.config.importers import axolotl, llamafactory, xllm
    from tuneforge.config.importers.table import Secret

    for module in (axolotl, llamafactory, xllm):
        for key, rule in module.RULES.items():
            if looks_secret(key):
                with pytest.raises(Secret):
                    rule("x")


# --- X—LLM's own workflow keys (seed 000) -----------------------------------------------------------------------------


def test_xllm_dataset_key_names_a_registered_dataset():
    # the old importer stopped with "no train_local_path_to_data"
    result = translate({"model_name_or_path": "m", "dataset_key": "support-tickets"}, "xllm")
    assert Config.model_validate(result.config).data.train[0].custom == "support-tickets"
    general = translate({"model_name_or_path": "m", "dataset_key": "general", "train_local_path_to_data": "t.jsonl"}, "xllm")
    assert Config.model_validate(general.config).data.train[0].path == "t.jsonl"


def test_xllm_fuse_quantize_and_push_become_the_export_section():
    src = {**XLLM, "apply_lora": True, "fuse_after_training": True, "push_to_hub": True, "hub_model_id": "me/fused",
           "hub_private_repo": False, "quantization_after_fusing": True, "quantization_dataset_id": "calib.jsonl",
           "quantization_max_samples": 64, "gptq_bits": 8, "gptq_group_size": 64}
    result = translate(src, "xllm")
    assert result.left_out() == [], [(r.key, r.note) for r in result.left_out()]
    e = Config.model_validate(result.config).export
    assert e.merge and (e.hub_repo, e.hub_private, e.hub_push) == ("me/fused", False, "auto")
    assert (e.quantize.method, e.quantize.bits, e.quantize.group_size, e.quantize.calibration, e.quantize.samples) == \
        ("gptq", 8, 64, "calib.jsonl", 64)
    # the GPTQ model to its own repo when only quantized_hub_model_id is given
    q = translate({**src, "push_to_hub": False, "hub_model_id": None, "fuse_after_training": True,
                   "quantized_hub_model_id": "me/gptq", "quantized_hub_private_repo": True}, "xllm")
    e = Config.model_validate(q.config).export
    assert (e.hub_repo, e.hub_push, e.hub_private) == ("me/gptq", "gptq", True)
    # push_to_hub without a repo cannot be honoured: reported, not guessed
    row = rows_by_key(translate({**XLLM, "push_to_hub": True}, "xllm"))["push_to_hub"]
    assert row.status == NOT_MAPPED and "hub_model_id" in row.note


def test_tokenizer_paths_and_classes():
    x = translate({**XLLM, "tokenizer_name_or_path": "./tok"}, "xllm")
    assert Config.model_validate(x.config).model.tokenizer == "./tok"
    args = {**REQUEST["input"]["args"], "tokenizer_config": "./tok", "tokenizer_type": "LlamaTokenizerFast"}
    a = translate(args, "axolotl")
    assert Config.model_validate(a.config).model.tokenizer == "./tok"
    assert rows_by_key(a)["tokenizer_type"].status == "ignored" and "AutoTokenizer" in rows_by_key(a)["tokenizer_type"].note
    odd = rows_by_key(translate({**args, "tokenizer_type": "MyOwnTokenizer"}, "axolotl"))["tokenizer_type"]
    assert odd.status == NOT_MAPPED and "MyOwnTokenizer" in odd.note


def test_wandb_watch_is_refused_with_its_reason_and_off_is_ignored():
    on = rows_by_key(translate({**REQUEST["input"]["args"], "wandb_watch": "gradients"}, "axolotl"))["wandb_watch"]
    assert on.status == NOT_MAPPED and "histograms" in on.note
    off = rows_by_key(translate({**REQUEST["input"]["args"], "wandb_watch": False}, "axolotl"))["wandb_watch"]
    assert off.status == "ignored"


# --- the serverless worker's own request (seed 001) -------------------------------------------------------------------


def test_serverless_request_keys_map_to_the_run_they_ask_for():
    result = import_file(DATA / "seeds_001_request.json", "axolotl")
    assert result.left_out() == [], [(r.key, r.note) for r in result.left_out()]  # the seed's request imports whole
    cfg = Config.model_validate(result.config)
    assert (cfg.train.evals_per_epoch, cfg.train.saves_per_epoch, cfg.export.hub_repo) == (4, 1, "runpod/llama-fr-lora")
    assert cfg.export.hub_push == "auto" and cfg.train.finetune == "lora"  # auto pushes the adapter, as the worker does
    flash = rows_by_key(result)["flash_attention"]
    if importlib.util.find_spec("flash_attn") is None:
        assert cfg.model.attn_implementation == "auto" and "flash-attn is not installed" in flash.note
    args = {**REQUEST["input"]["args"], "adam_epsilon": 1e-6, "eval_batch_size": 8, "group_by_length": True,
            "sample_packing": False}
    cfg = Config.model_validate(translate(args, "axolotl").config)
    assert (cfg.train.adam_epsilon, cfg.train.eval_micro_batch_size, cfg.train.group_by_length) == (1e-6, 8, True)
    # group_by_length cannot sort packed bins: that one key is refused, packing stays
    packed = translate({**args, "sample_packing": True}, "axolotl")
    assert rows_by_key(packed)["group_by_length"].status == NOT_MAPPED and rows_by_key(packed)["sample_packing"].status == MAPPED
    assert Config.model_validate(packed.config).data.packing == "bins"


# --- what the file leaves implicit: the source tool's own default, written explicitly (issue 21) ---------------------


def imported(source, args):
    result = translate(args, source)
    return Config.model_validate(result.config), rows_by_key(result)


def test_llamafactory_minimal_file_trains_with_llamafactorys_defaults():
    # hparams/finetuning_args.py (lora_rank 8, alpha = 2 x rank, dropout 0, target all), model_args.py (gradient
    # checkpointing unless disabled), data_args.py (cutoff_len 2048, val_size 0), Seq2SeqTrainingArguments (5e-5, 3, linear, 8)
    cfg, rows = imported("llamafactory", {"model_name_or_path": "m", "dataset": "d.jsonl", "stage": "sft",
                                          "finetuning_type": "lora"})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16, 0.0, "all-linear")
    assert (cfg.train.gradient_checkpointing, cfg.train.lr, cfg.train.epochs, cfg.train.lr_scheduler) == (True, 5e-5, 3.0, "linear")
    assert (cfg.train.micro_batch_size, cfg.data.max_length, cfg.data.eval_split) == (8, 2048, 0.0)
    assert rows["lora_rank"].status == "source default" and "tuneforge's own: lora.r 16" in rows["lora_rank"].note
    assert "lora_dropout" not in rows  # equal to tuneforge's default: nothing to write, no row

    # a given rank sets the implicit alpha; disable_gradient_checkpointing decides, gradient_checkpointing: false does not
    cfg, _ = imported("llamafactory", {"model_name_or_path": "m", "dataset": "d.jsonl", "lora_rank": 32,
                                       "gradient_checkpointing": False, "cutoff_len": 4096})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.gradient_checkpointing, cfg.data.max_length) == (32, 64, True, 4096)
    cfg, _ = imported("llamafactory", {"model_name_or_path": "m", "dataset": "d.jsonl", "disable_gradient_checkpointing": True})
    assert cfg.train.gradient_checkpointing is False
    # a train_bash.py command predates v0.9.1's cutoff_len 2048; stage pt packs texts into cutoff_len blocks
    cfg, _ = imported("llamafactory", {"_script": "train_bash.py", "model_name_or_path": "m", "dataset": "d", "stage": "pt"})
    assert (cfg.data.max_length, cfg.data.group_texts, cfg.data.block_size, cfg.data.train_on) == (1024, True, 1024, "all")


def test_axolotl_minimal_file_trains_with_axolotls_defaults():
    # schemas/peft.py adapter None = full; schemas/training.py micro_batch_size 1; schemas/config.py sequence_len 512,
    # val_set_size 0.0; core/builders/base.py: 3% warmup without warmup keys
    args = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "learning_rate": 1e-4}
    cfg, rows = imported("axolotl", args)
    assert (cfg.train.finetune, cfg.train.micro_batch_size, cfg.data.max_length) == ("full", 1, 512)
    assert (cfg.data.eval_split, cfg.train.warmup_ratio, cfg.train.lr_scheduler) == (0.0, 0.03, "cosine")
    assert rows["adapter"].status == "source default"
    cfg, rows = imported("axolotl", {**args, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "warmup_steps": 5,
                                     "eval_steps": 10})
    assert (cfg.train.finetune, cfg.train.warmup_ratio, cfg.train.warmup_steps, cfg.train.eval_every) == ("lora", 0.0, 5, None)
    assert rows["eval_steps"].status == "ignored"  # no val_set_size, no test_datasets: axolotl does not evaluate


def test_xllm_minimal_file_trains_with_xllms_defaults():
    # seed 000's config reference: apply_lora false, batch 2, warmup 1000, weight decay 0.001, paged_adamw_8bit,
    # max_length 2048, LoRA rank 8 / dropout 0.1; no scheduler key (transformers' linear); the lm collator trains all tokens
    args = {"model_name_or_path": "m", "train_local_path_to_data": "d.jsonl"}
    cfg, _ = imported("xllm", args)
    assert (cfg.train.finetune, cfg.train.micro_batch_size, cfg.train.warmup_steps) == ("full", 2, 1000)
    assert (cfg.train.weight_decay, cfg.train.optimizer, cfg.train.lr_scheduler) == (0.001, "paged_adamw_8bit", "linear")
    assert (cfg.data.max_length, cfg.data.train_on, cfg.data.eval_split) == (2048, "all", 0.0)
    cfg, rows = imported("xllm", {**args, "apply_lora": True, "lora_alpha": 16, "eval_steps": 50})
    assert (cfg.train.finetune, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == ("lora", 8, 16, 0.1)
    assert cfg.train.eval_every is None and rows["eval_steps"].status == "ignored"  # do_eval false: no eval
