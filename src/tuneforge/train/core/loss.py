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


class _FusedLinearCE(torch.autograd.Function):
    """sum CE(hidden @ weight.T, targets) without ever forming the (N, V) logits: row chunks of logits are
    made, turned into their loss and into the gradients for hidden and weight, and dropped."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, smoothing: float, chunk: int):
        h, tgt = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, H), (N,)
        grad_h = torch.zeros_like(h) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None  # (V, H), weight dtype, like its .grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            t = tgt[start : start + chunk]
            keep = t != IGNORE
            if not bool(keep.any()):
                continue
            hc = h[start : start + chunk]
            x = (hc @ weight.T).float()  # (n, V): one chunk of logits, fp32
            safe_t = torch.where(keep, t, 0)[:, None]
            lse = torch.logsumexp(x, dim=-1)
            loss = lse - (1 - smoothing) * x.gather(1, safe_t).squeeze(1) - (smoothing * x.mean(dim=-1) if smoothing else 0)
            total += loss[keep].sum()
            g = torch.exp(x - lse[:, None]).sub_(smoothing / x.shape[-1])
            g.scatter_add_(1, safe_t, torch.full_like(g[:, :1], -(1 - smoothing)))
            g = g.mul_(keep[:, None].to(g.dtype)).to(weight.dtype)  # d loss / d logits of this chunk
            if grad_h is not None:
                grad_h[start : start + chunk] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.T, hc.to(weight.dtype))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = None if bool(grad_out == 1) else grad_out
        if scale is not None:
            grad_h = grad_h.mul_(scale.to(grad_h.dtype)) if grad_h is not None else None
            grad_w = grad_w.mul_(scale.to(grad_w.dtype)) if grad_w is not None else None
        return (grad_h.view(ctx.shape) if grad_h is not None else None), grad_w, None, None, None


def fused_linear_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                    chunk: int | None = None) -> torch.Tensor:
    """Sum of CE(hidden @ weight.T, targets) over targets != IGNORE, never holding (tokens, vocab) at all."""
    rows = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _FusedLinearCE.apply(hidden, weight, targets, float(label_smoothing), rows)


LOSS_KERNELS = ("chunked", "fused_linear", "liger")


def output_head(model):
    """The LM head's weight when the loss may bypass the head module (a plain Linear, no bias, no softcap,
    not adapted by LoRA), else None (then the loss uses the logits)."""
    unwrapped = getattr(model, "module", model)  # DDP
    head = unwrapped.get_output_embeddings() if hasattr(unwrapped, "get_output_embeddings") else None
    config = getattr(unwrapped, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or getattr(config, "final_logit_softcapping", None):
        return None
    w = head.weight
    # ZeRO-3 (ds_id, empty outside forward) and FSDP2 (DTensor shards) only gather weights inside forward.
    if w.dim() != 2 or w.numel() == 0 or hasattr(w, "ds_id") or type(w).__name__ == "DTensor":
        return None
    return w


def forward_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H) final hidden states (after the last norm); the model computes logits for one position only."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def token_loss(model, batch: dict[str, torch.Tensor], kernel: str = "chunked", label_smoothing: float = 0.0) -> torch.Tensor:
    """The summed masked CE of a batch by the chosen kernel. fused_linear / liger go from the final hidden
    states straight to the loss (no logits tensor); they fall back to chunked when the head is not a plain
    Linear (LoRA-adapted or resized-and-wrapped head, bias, logit softcapping)."""
    weight = output_head(model) if kernel != "chunked" else None
    if weight is None:
        return summed_ce(forward_logits(model, batch), batch["targets"], label_smoothing)
    hidden = forward_hidden(model, batch)
    if kernel == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="sum")
        return flce(weight, hidden.reshape(-1, hidden.shape[-1]), batch["targets"].reshape(-1))
    return fused_linear_ce(hidden, weight, batch["targets"], label_smoothing)


def reference_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The plain full-vocabulary fp32 loss, kept as the yardstick for tests and benchmarks."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum",
                           label_smoothing=label_smoothing)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens (counted by collate): what throughput is measured in."""
    return int(batch["real_tokens"])
