"""Preference losses as pure functions on sequence log-probs: DPO (sigmoid / cDPO label smoothing, robust,
IPO, hinge), ORPO, SimPO and KTO. No model, no trainer: a recipe computes log-probs, these turn them into
per-example losses and rewards. Each equals TRL 1.16's implementation of the same loss (tests/test_preference_losses.py).

Shapes: every argument is (P,) for P pairs (or examples, for KTO) unless said otherwise; log-probs are
summed over the completion's trained tokens unless the name says `avg` (mean per trained token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuneforge.data.render import IGNORE


@dataclass
class PairLoss:
    losses: torch.Tensor  # (P,) the loss of each pair (or example); the recipe sums them and divides by the count
    chosen_rewards: torch.Tensor  # (P,) detached: the implicit reward the method optimises
    rejected_rewards: torch.Tensor  # (P,)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) pre-shifted targets -> (B, T) log p(target), 0 where target == IGNORE.

    One row at a time in fp32: the full (B, T, V) fp32 log-softmax is never held at once."""
    safe = targets.clamp(min=0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    return (picked - lse) * (targets != IGNORE)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> PairLoss:
    """DPO on summed completion log-probs. `chosen_tokens`/`rejected_tokens` (trained token counts) are
    needed by ipo, which compares per-token log-ratios."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":  # with label_smoothing > 0: conservative DPO (cDPO), labels flipped with prob. eps
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":  # unbiased under label noise eps (Chowdhury et al. 2024); eps < 0.5
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # per-token log-ratios, as the IPO authors confirmed to TRL; beta is the paper's tau
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return PairLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, orpo_lambda: float) -> PairLoss:
    """ORPO's odds-ratio term on mean per-token log-probs: -lambda * log sigmoid(log odds(chosen) - log odds(rejected)).
    The recipe adds the chosen completions' NLL (SFT term) to these losses."""
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return PairLoss(-orpo_lambda * F.logsigmoid(log_odds), orpo_lambda * c.detach(), orpo_lambda * r.detach())


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    c, r = chosen_avg_logps.detach().float(), rejected_avg_logps.detach().float()
    return (c - r) - (_log1mexp(c) - _log1mexp(r))


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> PairLoss:
    """SimPO: reference-free, length-normalised: -log sigmoid(beta * (avg_c - avg_r) - gamma)."""
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PairLoss(losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: mean log-ratio on mismatched (prompt, completion) pairs; the recipe averages it
    over processes and clamps it at 0. Detached: no gradient flows through the reference point."""
    return (kl_logps - ref_kl_logps).mean().detach()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PairLoss:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples. `desirable` is a (P,) bool tensor; `kl`
    a scalar (>= 0). Rewards are returned for every example; chosen_rewards/rejected_rewards hold the
    desirable / undesirable examples' rewards (different lengths)."""
    ratio = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    return PairLoss(losses, rewards[desirable], rewards[~desirable])
