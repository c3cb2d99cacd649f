"""Preference recipes on the core: invariants (accumulation split, reference choices, resume, 2 processes)
on tiny synthetic pairs, and end-to-end runs on the shared fixtures' preference data that raise held-out
reward accuracy above its start."""

import json
import random
import shutil

import pytest
import yaml

import tiny
from conftest import FIXTURES
from helpers import run_cli
from tuneforge.config.schema import Config
from tuneforge.train.run import run, trainer

QUIET = {"log": lambda *a, **k: None}


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """'reverse the letters' pairs: chosen is the reversal, rejected the letters unchanged (varied lengths)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = [rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))]
        rows.append({"prompt": "reverse the letters: " + " ".join(letters), "chosen": " ".join(reversed(letters)),
                     "rejected": " ".join(letters) + " " + rng.choice("abc")})
    return rows


def config(tmp_path, model, train_file, name, method="dpo", data=None, pref=None, **train) -> Config:
    return Config.model_validate(config_dict(tmp_path, model, train_file, name, method, data, pref, **train))


def config_dict(tmp_path, model, train_file, name, method="dpo", data=None, pref=None, **train) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(train_file)}], "eval_split": 0.0, "cache_dir": str(tmp_path / "cache"), **(data or {})},
        "train": {"method": method, "finetune": "full", "lr": 1e-3, "seed": 3, "lr_scheduler": "constant", **train},
        "preference": pref or {},
        "output": {"dir": str(tmp_path / name)},
        "tracking": {"tensorboard": False, "plot": False},
    }


def first_step(cfg: Config, steps: int = 1) -> tuple[dict, dict]:
    """Metrics and gradients of the last of `steps` steps (earlier ones are applied)."""
    from tuneforge.train.core.step import update

    r = trainer(cfg, **QUIET)
    r.setup()
    for step in range(steps):
        if step:
            update(r.accel, r.model, r.optimizer, r.scheduler, None)
        m = r.backward_step(step)
    return m, {n: p.grad.clone() for n, p in r.model.named_parameters() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_batch8_accum1_equals_batch2_accum4(tmp_path, llama_dir, method):
    """The loss is normalised over the whole step (pairs; ORPO's NLL over chosen tokens; KTO's KL over the
    step), so splitting a step into micro-batches changes nothing; packed == padded as well."""
    train_file = tiny.write_jsonl(tmp_path / "p.jsonl", pair_rows(16, seed=1))
    runs = [first_step(config(tmp_path, llama_dir, train_file, f"r{mbs}{packing}", method, {"packing": packing},
                              micro_batch_size=mbs, grad_accum=accum))
            for mbs, accum, packing in ((8, 1, "padding_free"), (2, 4, "padding_free"), (8, 1, "off"))]
    (m1, g1), (m2, g2), (m3, g3) = runs
    for m in (m2, m3):
        assert abs(m["loss"] - m1["loss"]) <= 1e-5
        assert abs(m["rewards_chosen"] - m1["rewards_chosen"]) <= 1e-5
    assert max_diff(g1, g2) <= 1e-5 and max_diff(g1, g3) <= 1e-5
    assert m1["loss"] > 0 and max(g.abs().max().item() for g in g1.values()) > 0


@pytest.mark.parametrize("finetune,reference", [("full", "frozen_copy"), ("lora", "adapter_disabled")])
def test_precomputed_reference_equals_the_live_one(tmp_path, llama_dir, finetune, reference):
    """Reference log-probs computed once and cached give the same step as a frozen copy (full) or the
    adapter-disabled base (LoRA); a second run reads them from the cache next to the prepared data."""
    train_file = tiny.write_jsonl(tmp_path / "p.jsonl", pair_rows(12, seed=2))
    base = dict(finetune=finetune, micro_batch_size=4, grad_accum=2)
    pre = config(tmp_path, llama_dir, train_file, "pre", pref={"reference": "precomputed"}, **base)
    # Step 2: the policy has moved, so a "reference" that followed the policy would differ here.
    m_pre, g_pre = first_step(pre, steps=2)
    m_live, g_live = first_step(config(tmp_path, llama_dir, train_file, "live", pref={"reference": reference}, **base), steps=2)
    assert abs(m_pre["loss"] - m_live["loss"]) <= 1e-5 and max_diff(g_pre, g_live) <= 1e-5
    assert m_pre["reward_margin"] != 0
    cached = list((tmp_path / "cache").glob("*/reference-dpo-*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["train"]) == 12
    m_again, _ = first_step(config(tmp_path, llama_dir, train_file, "pre2", pref={"reference": "precomputed"}, **base), steps=2)
    assert m_again["loss"] == m_pre["loss"]


def test_dpo_qlora_on_cpu_still_learns_after_an_eval(tmp_path, llama_dir):
    """The held-out eval runs under step.eval_mode: a plain model.eval() forward repacks bitsandbytes' 4-bit
    CPU weights and every LoRA gradient after it is exactly zero (STACK-NOTES)."""
    pytest.importorskip("bitsandbytes")
    train_file = tiny.write_jsonl(tmp_path / "p.jsonl", pair_rows(16, seed=4))
    d = config_dict(tmp_path, llama_dir, train_file, "q", data={"eval_size": 4}, finetune="lora", micro_batch_size=4, max_steps=2)
    cfg = Config.model_validate({**d, "model": {"path": str(llama_dir), "quantize": "4bit"}})
    r = trainer(cfg, **QUIET)
    r.setup()  # the DPO recipe evaluates the held-out pairs here, before training
    assert 0 <= r.recipe.before["eval_reward_accuracy"] <= 1
    r.recipe.evaluate()  # and once more, as eval_every would
    r.backward_step(0)
    lora_b = {n: p.grad for n, p in r.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())


def test_resume_reproduces_uninterrupted_dpo_run(tmp_path, llama_dir):
    from test_distributed import _max_diff, _weights  # the core's helpers

    train_file = tiny.write_jsonl(tmp_path / "p.jsonl", pair_rows(24, seed=3))
    cfg = config(tmp_path, llama_dir, train_file, "full", max_steps=4, micro_batch_size=4, save_every=2, keep_checkpoints=2)
    run(cfg, **QUIET)
    crashed = tmp_path / "crashed"  # as if killed after step 2
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-0000004")
    info = json.loads((crashed / "run_info.json").read_text())
    (crashed / "run_info.json").write_text(json.dumps({**info, "status": "running"}))
    run(config(tmp_path, llama_dir, train_file, "crashed", max_steps=4, micro_batch_size=4, save_every=2, keep_checkpoints=2),
        resume=True, **QUIET)
    assert _max_diff(_weights(tmp_path / "full"), _weights(crashed)) <= 1e-6
    logged = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x] == [1, 2, 3, 4]


@pytest.mark.slow
def test_dpo_two_processes_equal_one_process(tmp_path):
    from test_distributed import _max_diff, _train, _two_process_run, _weights  # the core's helpers

    model = tiny.build_model(tmp_path / "llama", "llama")
    train_file = tiny.write_jsonl(tmp_path / "p.jsonl", pair_rows(32, seed=4))
    # 8 held-out pairs: the core's helper also checks the sharded eval loss equals one process's.
    cfg = config_dict(tmp_path, model, train_file, "runs/one", data={"eval_size": 8}, max_steps=3, micro_batch_size=2, grad_accum=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _train(path, [])
    out = _two_process_run(tmp_path, path, "ddp", ["train.grad_accum=1"])  # 2 x 2 x 1 == 1 x 2 x 2 pairs per step
    assert _max_diff(_weights(tmp_path / "runs" / "one"), _weights(out)) <= 1e-5


# ---- end to end on the shared fixtures ----------------------------------------------------------------

HH = FIXTURES / "datasets" / "hh-rlhf_harmless-base_test.jsonl.gz"
LF = FIXTURES / "datasets" / "llamafactory_dpo_en_demo.json"
needs_fixtures = pytest.mark.skipif(not HH.is_file() or not LF.is_file(), reason="shared fixtures not present")


def hh_lines() -> list[str]:
    import gzip

    with gzip.open(HH, "rt") as f:
        return f.readlines()


@pytest.fixture(scope="module")
def hh_model(tmp_path_factory):
    """A random-init tiny Llama with a 2k BPE vocabulary trained on hh-rlhf text (~4 characters a token:
    a 128-token pair holds a real reply, not a few letters of it)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=tiny.SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([json.loads(x)["chosen"] for x in hh_lines()[:1000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None, unk_token=None)
    fast.chat_template = tiny.CHATML
    torch.manual_seed(0)
    cfg = tiny.model_config("llama", len(fast))
    cfg.eos_token_id = fast.eos_token_id
    folder = tmp_path_factory.mktemp("hh_llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def fixture_config(tmp_path, model, method, train_spec, eval_spec=None, steps=24, eval_size=64, **pref):
    data = {"train": [train_spec], "max_length": 128, "pair_truncation": "prompt_first", "on_bad_row": "skip",
            "cache_dir": str(tmp_path / "cache")}
    data.update({"eval": [eval_spec]} if eval_spec else {"eval_size": eval_size})
    cfg = {"model": {"path": str(model)}, "data": data,
           "train": {"method": method, "finetune": "full", "max_steps": steps, "micro_batch_size": 8, "lr": 2e-3,
                     "lr_scheduler": "constant", "seed": 1},
           "preference": pref, "output": {"dir": str(tmp_path / f"run-{method}")}, "tracking": {"tensorboard": False, "plot": False}}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


LOGGED = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected")


@needs_fixtures
@pytest.mark.slow
def test_dpo_cli_on_hh_rlhf_raises_heldout_reward_accuracy(tmp_path, hh_model):
    proc = run_cli("train", fixture_config(tmp_path, hh_model, "dpo", {"path": str(HH), "samples": 240}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run-dpo"
    summary = json.loads((run_dir / "run_info.json").read_text())["summary"]
    assert summary["eval_reward_accuracy_before"] == 0.0  # policy == reference: every reward is 0
    assert summary["eval_reward_accuracy"] > 0.5 and summary["eval_reward_margin"] > 0, summary
    report = json.loads((run_dir / "data_report.json").read_text())["preference"]
    assert report["truncated_prompt"] > 0 and report["eval"] > 50
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(key in logged[0] for key in LOGGED)
    assert "reward accuracy (held-out pairs)" in proc.stdout


def kto_rows(pairs: list[str], out):
    """KTO rows derived from preference pairs: chosen -> desirable, rejected -> undesirable."""
    from tuneforge.data.formats import from_preference

    rows = []
    for line in pairs:
        pair = from_preference(json.loads(line))
        rows += [{"messages": pair["prompt"] + pair[side], "label": side == "chosen"} for side in ("chosen", "rejected")]
    return tiny.write_jsonl(out, rows)


@needs_fixtures
@pytest.mark.slow
def test_kto_on_rows_derived_from_pairs_raises_heldout_accuracy(tmp_path, hh_model):
    lines = hh_lines()
    heldout = tiny.write_jsonl(tmp_path / "heldout.jsonl", [json.loads(x) for x in lines[:64]])  # pairs from the head
    train = kto_rows(lines[-120:], tmp_path / "kto.jsonl")  # KTO rows from the tail
    cfg = Config.model_validate(yaml.safe_load(fixture_config(tmp_path, hh_model, "kto", {"path": str(train)}, {"path": str(heldout)}).read_text()))
    summary = run(cfg, **QUIET)
    assert summary["eval_reward_accuracy_before"] == 0.0  # policy == reference
    # Above the start, as the issue asks; at this budget (192 examples seen) it is not above chance (0.45 measured).
    assert summary["eval_reward_accuracy"] > summary["eval_reward_accuracy_before"], summary
    assert summary["kl"] >= 0 and summary["rewards_chosen"] != 0


@needs_fixtures
@pytest.mark.slow
@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_train_from_config_on_fixture(tmp_path, hh_model, method):
    cfg = Config.model_validate(yaml.safe_load(fixture_config(tmp_path, hh_model, method, {"path": str(LF), "samples": 64}, steps=6,
                                                                  eval_size=16).read_text()))
    summary = run(cfg, **QUIET)
    logged = [json.loads(x) for x in (tmp_path / f"run-{method}" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logged if "loss" in x]
    assert len(steps) == 6 and all(key in steps[0] for key in LOGGED)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert 0 <= summary["eval_reward_accuracy_before"] <= 1 and "eval_reward_accuracy" in summary
