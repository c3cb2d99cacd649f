"""Masked cross-entropy, summed (not averaged): the caller divides by the true target count of the
whole optimizer step, so accumulation splits and packing do not change the loss.

The loss never holds `[tokens, vocab]` in fp32. A plain `F.cross_entropy(logits.float())` keeps three
full-vocabulary buffers alive: the fp32 copy of the logits, the fp32 log-softmax saved for backward and
the fp32 gradient — at vocab 151k and 8k tokens that is ~15 GB. Here the logits are walked in row
chunks: each chunk is upcast, its loss and its gradient (softmax - one-hot) are computed at once, and
the gradient is stored in the logits' own dtype. Backward is then one multiply. Peak extra memory is
one gradient buffer in the logits' dtype plus one fp32 chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.render import IGNORE

CHUNK_BYTES = 64 << 20  # one fp32 chunk of rows: 64 MiB (~110 tokens at vocab 151k), small next to the model


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # use_cache=False: with a cache, packed rows (restarting position_ids) attend across samples.
    return model(**inputs, use_cache=False).logits  # (B, T, V)


class _ChunkedCE(torch.autograd.Function):
    """sum over rows with target != IGNORE of CE(logits[row], target[row]); gradient computed in forward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, smoothing: float, chunk: int) -> torch.Tensor:
        flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (N, V), (N,)
        grad = torch.empty_like(flat) if flat.requires_grad else None  # logits' dtype: never fp32 unless they are
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], chunk):
            t = tgt[start : start + chunk]
            keep = t != IGNORE  # (n,) prompt and padding positions carry no loss and no gradient
            x = flat[start : start + chunk].float()  # (n, V): a view when the logits are fp32, else one fp32 chunk
            safe_t = torch.where(keep, t, 0)[:, None]
            lse = torch.logsumexp(x, dim=-1)
            loss = lse - (1 - smoothing) * x.gather(1, safe_t).squeeze(1) - (smoothing * x.mean(dim=-1) if smoothing else 0)
            total += loss[keep].sum()
            if grad is not None:
                g = grad[start : start + chunk]
                g.copy_(torch.exp(x - lse[:, None]).sub_(smoothing / x.shape[-1]))  # softmax - smoothing/V
                g.scatter_add_(1, safe_t, torch.full_like(g[:, :1], -(1 - smoothing)))  # - (1 - smoothing) one-hot
                g.mul_(keep[:, None].to(g.dtype))
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # In place: the buffer is used by this one backward only, and a copy would be one more (N, V) tensor.
        if not bool(grad_out == 1):
            grad.mul_(grad_out.to(grad.dtype))
        return grad.view(ctx.shape), None, None, None


def summed_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, chunk: int | None = None) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose target != IGNORE. targets are pre-shifted.

    Equal to `F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum",
    label_smoothing=label_smoothing)` in value and gradient (tested <= 1e-5), in a fraction of its memory.
    """
    rows = chunk or max(1, CHUNK_BYTES // (4 * logits.shape[-1]))
    return _ChunkedCE.apply(logits, targets, float(label_smoothing), rows)


def reference_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The plain full-vocabulary fp32 loss, kept as the yardstick for tests and benchmarks."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum",
                           label_smoothing=label_smoothing)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens (counted by collate): what throughput is measured in."""
    return int(batch["real_tokens"])
