"""GRPO end to end through `tuneforge train`: the held-out reward of a tiny model rises well above its start,
per-step metrics and samples are logged, a run killed mid-round resumes bit-identically, two processes equal
one, and a reward that raises stops the run in one line naming the reward and the row (exit 2)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import tiny
from helpers import assert_user_error, run_cli, run_cli_inprocess

TESTS = str(Path(__file__).parent)
ENV = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}  # grpo_fixtures rewards


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model = tiny.build_model(root / "llama", "llama")
    rows = [{"prompt": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in tiny.reverse_rows(72, seed=1)]
    return root, model, tiny.write_jsonl(root / "prompts.jsonl", rows)


def config(root: Path, model: Path, prompts: Path, name: str, train: dict | None = None, grpo: dict | None = None, **extra) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(prompts)}], "eval_size": 8, "cache_dir": str(root / "cache"), "max_length": 64, "allow_code": True},
        "train": {"method": "grpo", "finetune": "full", "max_steps": 20, "micro_batch_size": 8, "grad_accum": 2, "lr": 3e-3,
                  "lr_scheduler": "constant", "seed": 3, **(train or {})},
        # A dense, checkable reward: the share of completion tokens drawn from a 64-token subset of the 512 (grpo_fixtures).
        "grpo": {"num_generations": 8, "max_completion_length": 8, "rewards": [{"type": "function", "function": "grpo_fixtures:low_ids"}],
                 **(grpo or {})},
        "output": {"dir": str(root / name)},
        "tracking": {"plot": False, "tensorboard": False},
        **extra,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg: Path, *args: str, env: dict | None = None):
    return run_cli("train", cfg, *args, env={**ENV, **(env or {})})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> list[dict]:
    """Every logged number of every step but wall-clock ones (speeds, memory)."""
    return [{k: v for k, v in r.items() if not k.endswith("tokens_per_s") and k != "peak_mem_gib"} for r in metrics(run) if "loss" in r]


def weights(run: Path) -> dict:
    out = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out.update(load_file(f))
    assert out
    return out


@pytest.mark.slow
def test_held_out_reward_rises_and_each_step_is_logged(base):
    root, model, prompts = base
    proc = train(config(root, model, prompts, "learn"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "learn"
    summary = json.loads((run / "run_info.json").read_text())["summary"]
    # Greedy completions of the 8 held-out prompts: ~1/8 of a random model's tokens are on target; trained, most are.
    assert summary["eval_reward_before"] < 0.3 and summary["eval_reward"] >= 0.75, summary
    steps = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for key in ("reward", "reward_std", "rewards/low_ids/mean", "rewards/low_ids/std", "completion_length", "clip_ratio",
                "gen_tokens_per_s", "train_tokens_per_s", "completions"):
        assert all(isinstance(r.get(key), (int, float)) for r in steps), key
    assert all(r["completions"] == 16 for r in steps)  # dapo's unit is tokens: completions are counted beside it
    first, last = sum(r["reward"] for r in steps[:5]) / 5, sum(r["reward"] for r in steps[-5:]) / 5
    assert last > first + 0.05, (first, last)  # the sampled reward rises too
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 * 4 and {s["step"] for s in samples} == set(range(1, 21))  # grpo.log_samples: 4 per step
    assert samples[0]["prompt"][-1]["role"] == "user" and "low_ids" in samples[0]["rewards"]
    report = (run / "report.html").read_text()
    assert "Generated samples" in report and samples[-1]["completion"][:3].strip() in report


# LoRA, a KL to the adapter-disabled reference, two optimizer steps per generated batch (no dropout: two processes
# draw other dropout masks than one, and the core's RNG resume is tested in test_kill_resume.py).
HARD = dict(train={"finetune": "lora", "max_steps": 4, "save_every": 3, "lr": 1e-3},
            grpo={"beta": 0.04, "num_iterations": 2, "loss_type": "grpo", "epsilon_high": 0.28}, lora={"r": 4})


@pytest.fixture(scope="module")
def reference(base):
    """The uninterrupted one-process run both tests below compare with."""
    root, model, prompts = base
    ref = train(config(root, model, prompts, "ref", **HARD))
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root / "ref"


@pytest.mark.slow
def test_killed_mid_round_resumes_bit_identical(base, reference):
    """Killed right after step 4, the last checkpoint (step 3) is mid-round: resumed, the run matches bit for bit."""
    root, model, prompts = base
    cfg = config(root, model, prompts, "killed", **HARD)
    assert train(cfg, env={"TUNEFORGE_FAULT": "kill@step:4"}).returncode == -signal.SIGKILL
    done = train(cfg, "--resume")
    assert done.returncode == 0 and "resumed from" in done.stderr + done.stdout, done.stderr[-3000:]
    a, b = curve(reference), curve(root / "killed")
    assert a == b and len(a) == 4
    assert all(r["kl"] >= 0 for r in a) and any(r["kl"] > 0 for r in a)
    assert (reference / "samples.jsonl").read_text() == (root / "killed" / "samples.jsonl").read_text()
    got, want = weights(root / "killed"), weights(reference)
    assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)


@pytest.mark.slow
def test_two_processes_equal_one(base, reference):
    """The same global batch (2 x 8 completions) as one process with grad_accum 2: the same completions and rewards,
    the same weights."""
    root, model, prompts = base
    hard = {**HARD, "train": {**HARD["train"], "grad_accum": 1, "save_every": None}}
    two = train(config(root, model, prompts, "two", **hard), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    keys = ("reward", "reward_std", "completion_length", "completions", "completions_truncated")
    a, b = curve(reference), curve(root / "two")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5
    assert json.loads((root / "two" / "run_info.json").read_text())["processes"] == 2
    got, want = weights(root / "two"), weights(reference)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5


def test_a_reward_that_raises_names_itself_and_the_row(base, tmp_path):
    root, model, _ = base
    rows = [{"prompt": "reverse the letters: a b", "answer": "1"}, {"prompt": "reverse the letters: c d", "answer": "x"}]
    prompts = tiny.write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = config(tmp_path, model, prompts, "bad", train={"max_steps": 1},
                 grpo={"rewards": [{"type": "function", "function": "grpo_fixtures:fails_on_x"}]})
    data = yaml.safe_load(cfg.read_text())
    data["data"].pop("eval_size")
    data["data"]["eval_split"] = 0
    cfg.write_text(yaml.safe_dump(data))
    # In this process (tests/ is on sys.path here): the CLI's own error boundary, without an interpreter start.
    assert_user_error(run_cli_inprocess("train", str(cfg)), "reward 'fails_on_x'", "bad.jsonl row 2", "ValueError")
    info = json.loads((tmp_path / "bad" / "run_info.json").read_text())
    assert info["status"] == "failed" and "fails_on_x" in info["error"]


def test_qlora_on_cpu_still_learns_after_generating(base, tmp_path):
    """4-bit base + LoRA on CPU: the held-out eval and every rollout generate under step.eval_mode, which keeps the
    4-bit layers from being repacked for inference; after them the LoRA gradients are non-zero and every LoRA weight moves."""
    pytest.importorskip("bitsandbytes")
    from tuneforge.config import load_config
    from tuneforge.train.core.step import update
    from tuneforge.train.run import trainer

    root, model, prompts = base
    path = config(tmp_path, model, prompts, "qlora", train={"finetune": "lora", "max_steps": 2, "lr": 1e-2})
    raw = yaml.safe_load(path.read_text())
    raw["model"]["quantize"] = "4bit"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    r = trainer(cfg, log=lambda *a: None)
    r.setup()
    assert "eval_reward" in r.recipe.before  # generated once already, before the first step
    start = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
    r.model.train()
    for step in range(2):
        r.backward_step(step)
        grads = [p.grad.abs().sum().item() for n, p in r.model.named_parameters() if "lora_B" in n and p.grad is not None]
        assert grads and all(g > 0 for g in grads), (step, grads)
        update(r.accel, r.model, r.optimizer, r.scheduler, 1.0)
    r.close()
    assert all(bool((p.detach() != start[n]).any()) for n, p in r.model.named_parameters() if p.requires_grad)


def test_prepare_renders_and_checks_prompt_rows(base, tmp_path):
    """`tuneforge prepare` on a grpo config renders the prompt rows and names a bad one (here: a reply given)."""
    root, model, prompts = base
    ok = run_cli_inprocess("prepare", str(config(tmp_path, model, prompts, "prep")))
    assert ok.returncode == 0, ok.stderr
    report = json.loads((tmp_path / "prep" / "data_report.json").read_text())
    assert report["train_prompts"] == 64 and report["eval_prompts"] == 8 and report["columns"] == ["answer"]
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "a"},
                                                                                   {"role": "assistant", "content": "b"}]}])
    proc = run_cli_inprocess("prepare", str(config(tmp_path, model, bad, "prep_bad")))
    assert_user_error(proc, "bad.jsonl row 2", "ends with an assistant turn")
    pushed = run_cli_inprocess("prepare", str(config(tmp_path, model, prompts, "prep_push")), "--push-to", "me/x")
    assert_user_error(pushed, "--push-to", "prompt rows are not exported")  # refused before any work: nothing written
    assert not (tmp_path / "prep_push").exists()
