"""GRPO on the shared loop: prompts in, completions sampled online from the current model, scored by reward
functions, trained with the clipped group-relative policy loss. Reads top to bottom: batcher -> setup ->
batches (generate, score, advantages) -> loss -> evaluate.

One optimizer step sees `micro_batch_size x grad_accum x processes` completions: that many / num_generations
prompts, each with its whole group on one process. A generated batch (a "round") trains `num_iterations`
steps; the log-probs of the policy that sampled it are kept for the ratio (only needed when that is > 1).

Sampling is reproducible without any RNG state: each completion draws from its own generator seeded by
(train.seed, round, prompt, generation index). A completion therefore does not depend on the batch it was
generated in, on the process that generated it, or on a resume; the rest of the checkpointed state is the
round's rollout itself (recipe_state), so a run resumed mid-round trains on exactly the same completions.

Loss: grpo_loss.py's pure functions (TRL 1.16's semantics for grpo / bnpo / dr_grpo / dapo); the loop divides
the step's summed loss by the step's count (completions, micro-batches or tokens, per loss_type).
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import torch
from transformers import LogitsProcessor

from tuneforge.errors import UserError
from tuneforge.train.recipes import grpo_loss as gl
from tuneforge.train.recipes import pairs
from tuneforge.train.recipes.preference import token_logps

UNITS = {"grpo": "completions", "bnpo": "micro_batches", "dr_grpo": "completions", "dapo": "completion_tokens"}


# ---- sampling ------------------------------------------------------------------------------------------


def sample_seed(seed: int, round_: int, unit: int, generation: int) -> int:
    """The seed of one completion's sampling generator: a hash, so no two (round, prompt, generation) share one."""
    digest = hashlib.sha256(f"{seed}:{round_}:{unit}:{generation}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededSampler(LogitsProcessor):
    """A logits processor that samples each row's next token from that row's own generator (temperature, top-k,
    top-p as transformers' warpers apply them) and leaves only that token possible, so greedy decoding in
    `generate` emits it. One draw per row and position: a row's tokens depend on its seed alone."""

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds, self.generators = seeds, None
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                           + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        cdf = torch.softmax(self.warpers(input_ids, scores).double(), dim=-1).cumsum(dim=-1)  # (B, V)
        u = torch.cat([torch.rand(1, generator=g, device=scores.device, dtype=torch.float64) for g in self.generators])  # (B,)
        # Inverse CDF: the first token whose cumulative probability exceeds u (a token of probability 0 never is).
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=scores.shape[-1] - 1)  # (B, 1)
        only = torch.full_like(scores, -math.inf)
        return only.scatter_(1, picks, 0.0)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
             sampler: SeededSampler | None = None) -> list[list[int]]:
    """Completions of `prompts` (token ids, left-padded into one batch): sampled with `sampler`, greedy
    without. Each completion ends at (and keeps) its first stop token, as TRL's; a completion without one
    was cut at max_new_tokens."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                         logits_processor=[sampler] if sampler else None)
    completions = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
        completions.append(row[:end])
    return completions


# ---- log-probs and loss ----------------------------------------------------------------------------------


def completion_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """(M,) log-probs of the batch's trained completion tokens, sequence by sequence, of the logits divided by
    the sampling temperature (as TRL scores them)."""
    logits = pairs.forward(model, batch)  # (R, T, V)
    per_token = token_logps(logits if temperature == 1.0 else logits / temperature, batch["targets"])  # (R, T), 0 off target
    return per_token[batch["seq"] >= 0]


def policy_loss(model, batch: dict, g) -> tuple[torch.Tensor, gl.TokenLoss]:
    """One micro-batch: (its loss summed over the units count_units counts, the per-token terms). `batch` holds
    the collated sequences, `advantages` (N,) and, when kept, `old_logps` / `ref_logps` (M,) per trained token."""
    seq = batch["seq"][batch["seq"] >= 0]  # (M,) completion of each trained token
    logps = completion_logps(model, batch, g.temperature)
    high = g.epsilon_high if g.epsilon_high is not None else g.epsilon
    out = gl.token_loss(logps, batch.get("old_logps"), batch["advantages"][seq], g.epsilon, high, g.beta, batch.get("ref_logps"))
    return gl.reduce_loss(out.loss, seq, int(batch["n_seqs"]), g.loss_type, g.max_completion_length), out


# ---- the rollout of one round ---------------------------------------------------------------------------


class Completion:
    """A prompt + one sampled completion as a training sequence (pairs.collate_sequences reads input_ids and
    labels): the labels cover the completion only, and none of it when `masked` (a truncated completion under
    grpo.mask_truncated_completions)."""

    def __init__(self, prompt_ids: list[int], completion_ids: list[int], masked: bool):
        from tuneforge.data.render import IGNORE

        self.input_ids = prompt_ids + completion_ids
        self.labels = [IGNORE] * len(prompt_ids) + ([IGNORE] * len(completion_ids) if masked else completion_ids)


class GRPORecipe:
    name = "grpo"
    unit = "completions"  # what count() counts; set per loss_type in batcher()
    items_name = "prompts"

    # ---- data and batcher ---------------------------------------------------------------------------
    @staticmethod
    def prepare_data(ctx):
        """Prompt rows (data/prompts.py) instead of SFT samples: rendered with the chat template and its generation
        prompt. Every process renders them itself (cheap, deterministic): nothing to wait for on disk."""
        from tuneforge.data.prompts import prepare_prompts

        return prepare_prompts(ctx.cfg.data, ctx.tokenizer, ctx.cfg.grpo.max_completion_length)

    def batcher(self, ctx):
        from tuneforge.data.templates import stop_token_ids
        from tuneforge.train.recipes.grpo_rewards import build

        self.ctx = ctx
        cfg, t, g = ctx.cfg, ctx.cfg.train, ctx.cfg.grpo
        self.g = g
        self.unit = UNITS[g.loss_type]
        self.prompts, self.eval_prompts = ctx.data.train, ctx.data.eval
        self.rewards = build(g.rewards, g.max_completion_length)
        self.weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        self.stop_ids = stop_token_ids(ctx.tokenizer)
        self.pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.rollout: dict | None = None  # {"round": r, "micro": [batch on CPU], "metrics": {...}}
        per_process = t.micro_batch_size * t.grad_accum // g.num_generations
        batcher = RoundBatcher(self.prompts, per_process, ctx.accel.num_processes, t.seed, g.num_iterations)
        if batcher.steps_per_epoch == 0:
            raise UserError(f"{len(self.prompts)} training prompts but one optimizer step needs {batcher.units_per_step} "
                            f"(micro_batch_size x grad_accum x processes / grpo.num_generations): lower train.micro_batch_size "
                            "or train.grad_accum, or add prompts")
        return batcher

    def setup(self, ctx) -> None:
        from tuneforge.train.recipes.reference import Reference

        self.ref = Reference(ctx, self.name) if self.g.beta else None
        if self.ref:
            ctx.log(f"{self.name}: KL to the reference = {self.ref.kind}, beta {self.g.beta}")
        if ctx.accel.is_main_process and ctx.resume:
            keep_samples_until(ctx.run.samples, ctx.start_step)  # what a resumed run writes again is dropped
        self.before = {}
        if not ctx.start_step and self.eval_prompts:
            self.before = self.evaluate()
            ctx.log(f"{self.name}: held-out reward before training {self.before['eval_reward']:.3f}")

    # ---- batches: generate, score, advantages ---------------------------------------------------------
    def batches(self, sb) -> list[dict]:
        round_ = sb.step // self.g.num_iterations
        if self.rollout is None or self.rollout["round"] != round_:
            self.rollout = self._rollout(sb, round_)
        self.step_began = time.perf_counter()
        self.generated = sb.step % self.g.num_iterations == 0
        return [pairs.to_device(b, self.ctx.accel.device) for b in self.rollout["micro"]]

    def _rollout(self, sb, round_: int) -> dict:
        from tuneforge.train.core.step import eval_mode

        ctx, g, t = self.ctx, self.g, self.ctx.cfg.train
        micro = sb.micro[0]
        # Rows: each prompt's group adjacent, as the advantages assume.
        rows = [(p, u, k) for p, u in zip(micro.items, micro.units) for k in range(g.num_generations)]
        model = ctx.plain_model
        began = time.perf_counter()
        # All of this process's completions in one generate call (as TRL); each row draws from its own generator.
        sampler = SeededSampler([sample_seed(t.seed, round_, u, k) for _, u, k in rows], g.temperature, g.top_k, g.top_p)
        with eval_mode(ctx.model), ctx.accel.autocast():
            completions = generate(model, [p.prompt_ids for p, _, _ in rows], g.max_completion_length, self.stop_ids, self.pad_id, sampler)
        gen_seconds = time.perf_counter() - began
        prompts = [p for p, _, _ in rows]
        texts, per_func = self._score(prompts, completions)
        truncated = [not c or c[-1] not in self.stop_ids for c in completions]
        local = torch.cat([per_func,
                           torch.tensor([[len(c), tr] for c, tr in zip(completions, truncated)], dtype=torch.float64)], dim=1)
        everyone = ctx.accel.gather(local.to(ctx.accel.device)).cpu()  # (all completions, rewards + 2), rank order
        total = gl.combine_rewards(everyone[:, : len(self.rewards)], self.weights)
        advantages = gl.group_advantages(total, g.num_generations, g.scale_rewards)
        rank = ctx.accel.process_index
        mine = advantages[rank * len(rows) : (rank + 1) * len(rows)].float()
        seqs = [Completion(p.prompt_ids, c, g.mask_truncated_completions and tr) for p, c, tr in zip(prompts, completions, truncated)]
        batches = []
        for start in range(0, len(seqs), t.micro_batch_size):
            # Padded rows, never packed: a group's completions have similar lengths (little padding), while a packed
            # row pays a block-diagonal attention mask over the whole micro-batch on sdpa (~1.6x slower on CPU).
            b = pairs.collate_sequences(seqs[start : start + t.micro_batch_size], self.pad_id, packed=False)
            b["advantages"] = mine[start : start + t.micro_batch_size]
            b["n_tokens"] = torch.tensor(int((b["seq"] >= 0).sum()))
            batches.append(b)
        self._policy_logps(batches)
        metrics = self._round_metrics(everyone, total, gen_seconds)
        self._step_scale(batches)
        if ctx.accel.is_main_process and g.log_samples:
            self._write_samples(sb.step, prompts, texts, per_func, mine)
        return {"round": round_, "micro": batches, "metrics": metrics, "completions": len(everyone)}

    def _score(self, prompts: list, completions: list[list[int]]) -> tuple[list[str], torch.Tensor]:
        """-> (the decoded completions, their (N, K) rewards; NaN where a reward does not apply)."""
        from tuneforge.train.recipes.grpo_rewards import score

        texts = self.ctx.tokenizer.batch_decode(completions, skip_special_tokens=True)
        values = score(self.rewards, texts, completions, [p.messages for p in prompts], [p.columns for p in prompts],
                       [p.where for p in prompts])
        return texts, torch.tensor(values, dtype=torch.float64).reshape(len(completions), len(self.rewards))

    @torch.no_grad()
    def _policy_logps(self, batches: list[dict]) -> None:
        """Per-token log-probs of the sampling policy (when num_iterations > 1: the ratio's denominator on later
        steps) and of the reference (beta > 0), on CPU with each batch."""
        from tuneforge.train.core.step import eval_mode

        ctx = self.ctx
        model = ctx.plain_model
        for b in batches:
            on = pairs.to_device(b, ctx.accel.device)
            with eval_mode(ctx.model), ctx.accel.autocast():
                if self.g.num_iterations > 1:
                    b["old_logps"] = completion_logps(model, on, self.g.temperature).cpu()
                if self.ref is not None:
                    with self.ref.active() as ref_model:
                        b["ref_logps"] = completion_logps(ref_model, on, self.g.temperature).cpu()

    def _step_scale(self, batches: list[dict]) -> None:
        """Step constants, reduced over processes: the count of the whole step (dapo: 0 when every completion is
        masked; then each micro-batch counts 1 and the zero loss is divided by that) and the factor that turns
        token-summed metrics into means per token after the loop divides them by the count."""
        local = torch.tensor([sum(self._units(b) for b in batches), sum(int(b["n_tokens"]) for b in batches)],
                             dtype=torch.float64, device=self.ctx.accel.device)
        units, tokens = self.ctx.accel.reduce(local, reduction="sum").tolist()
        self.empty_step = units == 0
        for b in batches:
            b["count"] = torch.tensor(1 if self.empty_step else self._units(b))
            b["metric_scale"] = torch.tensor((units or len(batches) * self.ctx.accel.num_processes) / max(tokens, 1.0))

    def _units(self, b: dict) -> int:
        return gl.count_units(self.g.loss_type, int(b["n_seqs"]), int(b["n_tokens"]))

    # ---- loss -----------------------------------------------------------------------------------------
    def loss(self, model, batch):
        total, out = policy_loss(model, batch, self.g)
        scale = batch["metric_scale"]
        metrics = {"clip_ratio": (out.low_clipped | out.high_clipped).float().sum() * scale,
                   "clip_ratio_low": out.low_clipped.float().sum() * scale, "clip_ratio_high": out.high_clipped.float().sum() * scale}
        if out.kl is not None:
            metrics["kl"] = out.kl.sum() * scale
        return total, metrics

    @staticmethod
    def count(batch) -> int:
        return int(batch["count"])

    tokens = staticmethod(pairs.real_tokens)

    def step_metrics(self, m: dict) -> dict:
        """The round's reward and generation metrics beside the loss; tokens/s of generation and of training apart."""
        m.update(self.rollout["metrics"] if self.generated else {k: v for k, v in self.rollout["metrics"].items() if k != "gen_tokens_per_s"})
        m["train_tokens_per_s"] = round(m["tokens"] / max(time.perf_counter() - self.step_began, 1e-9), 1)
        m.setdefault("completions", self.rollout["completions"])
        return m

    def _round_metrics(self, everyone: torch.Tensor, total: torch.Tensor, gen_seconds: float) -> dict:
        """Over all processes' completions of the round (`total`: their weighted rewards): reward mean/std (total and
        per reward), completion length, the share truncated, the share of groups whose rewards are all equal (no
        signal), generation tokens/s."""
        k, g = len(self.rewards), self.g
        lengths, truncated = everyone[:, k], everyone[:, k + 1]
        out = {"reward": _num(torch.nanmean(total)), "reward_std": _num(gl.nanstd(total))}
        for i, r in enumerate(self.rewards):
            out[f"rewards/{r.name}/mean"] = _num(torch.nanmean(everyone[:, i]))
            out[f"rewards/{r.name}/std"] = _num(gl.nanstd(everyone[:, i]))
        grouped = total.view(-1, g.num_generations)
        out["frac_reward_zero_std"] = float((grouped.max(1).values == grouped.min(1).values).double().mean())
        out["completion_length"] = float(lengths.mean())
        out["completions_truncated"] = float(truncated.mean())
        # Every process generates its share at once: tokens of all of them over this process's wall time.
        out["gen_tokens_per_s"] = round(float(lengths.sum()) / max(gen_seconds, 1e-9), 1)
        return out

    def _write_samples(self, step: int, prompts: list, texts: list[str], per_func: torch.Tensor, advantages: torch.Tensor) -> None:
        with open(self.ctx.run.samples, "a", encoding="utf-8") as f:
            for i in range(min(self.g.log_samples, len(texts))):
                rewards = {r.name: _num(per_func[i, j]) for j, r in enumerate(self.rewards)}
                f.write(json.dumps({"step": step + 1, "prompt": prompts[i].messages, "completion": texts[i], "rewards": rewards,
                                    "advantage": round(float(advantages[i]), 4)}, ensure_ascii=False) + "\n")

    # ---- eval -----------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Mean reward of one greedy completion per held-out prompt (all rewards, weighted), sharded across processes:
        {"eval_reward", "eval_rewards/<name>"}; {} without held-out prompts."""
        from tuneforge.data.batcher import eval_batches
        from tuneforge.train.core.step import eval_mode

        ctx = self.ctx
        if not self.eval_prompts:
            return {}
        model = ctx.plain_model
        k = len(self.rewards)
        sums = torch.zeros(k + 2, dtype=torch.float64)  # weighted total, per reward, count
        for mb in eval_batches(self.eval_prompts, ctx.eval_batch_size, ctx.accel.process_index, ctx.accel.num_processes):
            if mb.dummy:
                continue
            with eval_mode(ctx.model), ctx.accel.autocast():
                ids = generate(model, [p.prompt_ids for p in mb.items], self.g.max_completion_length, self.stop_ids, self.pad_id)
            _, values = self._score(mb.items, ids)
            sums += torch.cat([gl.combine_rewards(values, self.weights).nan_to_num().sum()[None], values.nan_to_num().sum(0),
                               torch.tensor([float(len(ids))], dtype=torch.float64)])
        total = ctx.accel.reduce(sums.to(ctx.accel.device), reduction="sum").cpu()
        n = max(float(total[-1]), 1.0)
        out = {"eval_reward": float(total[0]) / n}
        out.update({f"eval_rewards/{r.name}": float(total[1 + i]) / n for i, r in enumerate(self.rewards)})
        return out

    def summary(self, last: dict) -> dict:
        out = {k: v for k, v in last.items() if k.startswith(("reward", "kl", "clip_ratio", "completion_length"))}
        out.update({f"{k}_before": v for k, v in self.before.items()})
        return out

    def run_info(self) -> dict:
        return {"method": self.name, "reference": self.ref.kind if self.ref else None}

    def parity_samples(self) -> list[list[int]]:
        return [p.prompt_ids for p in (self.eval_prompts or self.prompts)[:4]]

    # ---- checkpointed state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The current round's rollout (its completions, advantages, old and reference log-probs): a run resumed
        mid-round (num_iterations > 1) trains on the same completions. Sampling itself needs no state (see top)."""
        return {"rollout": self.rollout} if self.rollout is not None and self.g.num_iterations > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        self.rollout = state.get("rollout")


def _num(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def keep_samples_until(path, step: int) -> None:
    """Drop samples.jsonl lines of steps after `step` (a resumed run generates them again)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    p.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")


class RoundBatcher:
    """Deals prompts out to rounds: optimizer step s trains on round s // num_iterations, whose prompts the
    shared Batcher picks (prompts of a step split over processes by the same rule as any item)."""

    def __init__(self, prompts: list, per_process: int, world: int, seed: int, iterations: int):
        from tuneforge.data.batcher import Batcher

        self.inner = Batcher(prompts, None, per_process, 1, world, seed)
        self.iterations = iterations
        self.items, self.units = self.inner.items, self.inner.units

    @property
    def units_per_step(self) -> int:
        return self.inner.units_per_step

    @property
    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch * self.iterations

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps or math.ceil(epochs * self.inner.steps_per_epoch) * self.iterations

    def signature(self) -> str:
        return f"{self.inner.signature()} iterations={self.iterations}"

    def step(self, step: int, rank: int = 0):
        from tuneforge.data.batcher import StepBatch

        sb = self.inner.step(step // self.iterations, rank)
        return StepBatch(step, sb.epoch, sb.micro)
