"""GRPO's loss as pure functions: group advantages from rewards, the clipped policy-ratio loss per token,
the KL to the reference, and the four normalisations (`loss_type`). No model, no trainer: the recipe
(train/recipes/grpo.py) computes per-token log-probs and calls these. Each equals TRL 1.16's GRPOTrainer
on the same inputs (tests/test_grpo_loss.py).

Shapes: token tensors are flat, (M,) over the M trained completion tokens of a micro-batch, in sequence
order; `seq` (M,) says which of the micro-batch's N completions a token belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation with Bessel's correction, ignoring NaNs (NaN where fewer than 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(n > 1, n / (n - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, K) rewards of K functions (NaN = the function does not apply) -> (N,) weighted sum; NaN where no
    function applied (such a completion gets advantage 0)."""
    total = (per_func * weights[None, :]).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """(N,) rewards, N = prompts x num_generations with each prompt's generations adjacent -> (N,) advantages:
    reward minus its group's mean, divided by the std (+1e-4) of the group (scale "group"), of the whole batch
    ("batch"), or not at all ("none": Dr. GRPO)."""
    grouped = rewards.view(-1, num_generations)
    advantages = rewards - torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations) if num_generations > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + 1e-4)
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return torch.nan_to_num(advantages, nan=0.0)


@dataclass
class TokenLoss:
    loss: torch.Tensor  # (M,) per-token loss (policy term + beta * KL)
    kl: torch.Tensor | None  # (M,) detached per-token KL to the reference, None when beta == 0
    low_clipped: torch.Tensor  # (M,) bool: ratio below 1 - epsilon with a negative advantage
    high_clipped: torch.Tensor  # (M,) bool: ratio above 1 + epsilon_high with a positive advantage


def token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, epsilon: float,
               epsilon_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None) -> TokenLoss:
    """PPO's clipped surrogate per token: -min(r A, clip(r, 1-epsilon, 1+epsilon_high) A), r = pi/pi_old
    (old_logps None: the policy that sampled is this one, r = 1 with its gradient), plus beta times the
    k3 estimate of KL(pi || pi_ref) = exp(ref - logp) - (ref - logp) - 1, weighted by r so that its gradient
    is the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL 1.16's default use_bias_correction_kl).
    `advantages` is per token (M,)."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        diff = ref_logps - logps
        per_token_kl = (torch.exp(diff) - diff - 1) * ratio
        loss = loss + beta * per_token_kl
        kl = per_token_kl.detach()
    low = (ratio < 1 - epsilon) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return TokenLoss(loss, kl, low.detach(), high.detach())


def reduce_loss(per_token: torch.Tensor, seq: torch.Tensor, n_seqs: int, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """The micro-batch's loss SUMMED over the units that `count_units` counts (the core divides the step's sum
    by the step's count, so the whole step equals TRL's mean over its micro-batches):
      grpo     sum over completions of each one's mean token loss           (unit: completion)
      bnpo     mean token loss of this micro-batch                           (unit: micro-batch)
      dr_grpo  sum of token losses / max_completion_length                   (unit: completion)
      dapo     sum of token losses                                           (unit: token of the whole step)"""
    if loss_type == "grpo":
        sums = per_token.new_zeros(n_seqs).index_add(0, seq, per_token)
        counts = per_token.new_zeros(n_seqs).index_add(0, seq, torch.ones_like(per_token))
        return (sums / counts.clamp(min=1.0)).sum()
    if loss_type == "bnpo":
        return per_token.sum() / max(per_token.numel(), 1)
    if loss_type == "dr_grpo":
        return per_token.sum() / max_completion_length
    if loss_type == "dapo":
        return per_token.sum()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def count_units(loss_type: str, n_seqs: int, n_tokens: int) -> int:
    """What `reduce_loss` sums over, for one micro-batch (see there)."""
    return {"grpo": n_seqs, "bnpo": 1, "dr_grpo": n_seqs, "dapo": n_tokens}[loss_type]
