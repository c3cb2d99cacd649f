"""GRPO's loss equals TRL 1.16's GRPOTrainer._compute_loss on the same model, completions, advantages, old and
reference log-probs and masks (each loss_type, with and without KL, clipping active); group advantages by hand."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config.schema import GRPOConfig
from tuneforge.train.recipes import grpo_loss as gl
from tuneforge.train.recipes.grpo import Completion, completion_logps, policy_loss
from tuneforge.train.recipes.pairs import collate_sequences

B, P, C = 4, 3, 5  # completions, prompt tokens (same for all: no left padding), completion width
TEMPERATURE, EPS, EPS_HIGH = 0.7, 0.2, 0.28


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    from tiny import build_model

    folder = build_model(tmp_path_factory.mktemp("grpo_loss") / "m", hidden=32, layers=1)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    args = TRLConfig(output_dir=str(folder.parent / "trl"), per_device_train_batch_size=B, num_generations=B, max_completion_length=C,
                     temperature=TEMPERATURE, epsilon=EPS, epsilon_high=EPS_HIGH, report_to=[], use_cpu=True, bf16=False, save_strategy="no")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * B), processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    ours = AutoModelForCausalLM.from_pretrained(folder).train()  # the same weights; TRL wraps its own copy's head

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 200, (B, P), generator=g)
    completion = torch.randint(5, 200, (B, C), generator=g)
    # Lengths 5, 3, 1, 4; row 3 is a truncated completion masked out entirely (mask_truncated_completions).
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    lengths = [5, 3, 1, 4]
    seqs = [Completion(prompt[i].tolist(), completion[i, : lengths[i]].tolist(), masked=not mask[i].any()) for i in range(B)]
    batch = collate_sequences(seqs, tok.pad_token_id, packed=False)  # right-padded rows, as the recipe batches them
    with torch.no_grad():
        now = torch.zeros(B, C)
        now[mask.bool()] = completion_logps(ours, batch, TEMPERATURE)
    # Old log-probs: some ratios beyond 1 + epsilon_high (positive advantage), some below 1 - epsilon (negative), some inside.
    old = now + torch.tensor([[-0.5, 0.1, -0.05, -0.6, 0.0], [0.5, -0.1, 0.3, 0, 0], [0.02, 0, 0, 0, 0], [0.4, 0.4, 0.4, 0.4, 0]])
    ref = now + torch.randn(B, C, generator=g) * 0.3
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.0])
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones(B, P, dtype=torch.long), "completion_ids": completion,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    ours_batch = {**batch, "advantages": advantages, "old_logps": old[mask.bool()], "ref_logps": ref[mask.bool()]}
    return trainer, ours, inputs, ours_batch


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", gl.LOSS_TYPES)
def test_loss_and_gradient_equal_trl(setup, loss_type, beta):
    trainer, ours, inputs, batch = setup
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer._metrics["train"].clear()
    trainer.model.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)

    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    g = GRPOConfig(loss_type=loss_type, beta=beta, temperature=TEMPERATURE, epsilon=EPS, epsilon_high=EPS_HIGH, max_completion_length=C)
    total, out = policy_loss(ours, batch, g)
    count = gl.count_units(loss_type, B, int(out.loss.numel()))
    (total / count).backward()

    assert abs((total / count).item() - theirs.item()) <= 1e-5, (loss_type, beta, (total / count).item(), theirs.item())
    ours_grad, their_grad = ours.lm_head.weight.grad, trainer.model.lm_head.weight.grad
    assert torch.allclose(ours_grad, their_grad, atol=1e-6, rtol=1e-4), (ours_grad - their_grad).abs().max()
    m = trainer._metrics["train"]
    clipped = (out.low_clipped | out.high_clipped).float().mean().item()
    assert out.low_clipped.any() and out.high_clipped.any(), "both clip bounds must be active in this test"
    assert abs(clipped - m["clip_ratio/region_mean"][-1]) < 1e-6
    assert abs(out.high_clipped.float().mean().item() - m["clip_ratio/high_mean"][-1]) < 1e-6
    if beta:
        assert abs(out.kl.mean().item() - m["kl"][-1]) < 1e-5
    else:
        assert out.kl is None


def test_without_old_logps_the_ratio_is_one(setup):
    """num_iterations 1: no old log-probs kept; TRL then uses the current ones detached (ratio 1, nothing clipped)."""
    trainer, ours, inputs, batch = setup
    trainer.loss_type, trainer.beta = "grpo", 0.0
    theirs = trainer._compute_loss(trainer.model, {k: v for k, v in inputs.items() if k != "old_per_token_logps"})
    total, out = policy_loss(ours, {k: v for k, v in batch.items() if k != "old_logps"}, GRPOConfig(loss_type="grpo", temperature=TEMPERATURE))
    assert abs((total / B).item() - theirs.item()) <= 1e-5
    assert not (out.low_clipped | out.high_clipped).any()


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    std = (4 * 0.5**2 / 3) ** 0.5  # Bessel-corrected std of (1, 0, 0, 1)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    assert torch.allclose(gl.group_advantages(rewards, 4, "group"), expected / (std + 1e-4))
    assert torch.allclose(gl.group_advantages(rewards, 4, "none"), expected)  # Dr. GRPO: not scaled
    batch_std = rewards.std().item()  # over all 8
    assert torch.allclose(gl.group_advantages(rewards, 4, "batch"), expected / (batch_std + 1e-4))
    # Two rewards, weights 1 and 0.5; NaN = the reward does not apply; a completion none applies to gets 0.
    per_func = torch.tensor([[1.0, 2.0], [0.0, float("nan")], [float("nan"), float("nan")], [1.0, 0.0]], dtype=torch.float64)
    total = gl.combine_rewards(per_func, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert total[:2].tolist() == [2.0, 0.0] and total[3].item() == 1.0 and torch.isnan(total[2])
    adv = gl.group_advantages(total, 4, "none")
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]  # mean over the 3 scored: 1.0


def test_losses_by_hand():
    """The four normalisations on two completions of 3 and 1 trained tokens."""
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0])
    seq = torch.tensor([0, 0, 0, 1])
    assert gl.reduce_loss(per_token, seq, 3, "grpo", 8).item() == 2.0 + 4.0  # per completion means; the 3rd is empty
    assert gl.reduce_loss(per_token, seq, 3, "bnpo", 8).item() == 10.0 / 4
    assert gl.reduce_loss(per_token, seq, 3, "dr_grpo", 8).item() == 10.0 / 8
    assert gl.reduce_loss(per_token, seq, 3, "dapo", 8).item() == 10.0
    assert [gl.count_units(t, 3, 4) for t in gl.LOSS_TYPES] == [3, 1, 3, 4]
