"""Parity: tuneforge's DPO (sigmoid, robust, ipo, hinge), ORPO, SimPO and KTO losses and rewards equal TRL
1.16's on the same tiny model, the same reference model and the same token ids (<= 1e-5). The batch is built
by tuneforge's data layer (chat template, prompt masked) and handed to TRL's own collators as ids."""

import copy

import pytest
import torch

import tiny
from tuneforge.config.schema import DataConfig
from tuneforge.data.preference import pairs_to_unpaired
from tuneforge.data.prepare import prepare
from tuneforge.data.render import IGNORE
from tuneforge.train.recipes import preference as pl
from tuneforge.train.recipes.pairs import collate_pairs, collate_unpaired, forward, sequence_logps

pytestmark = pytest.mark.slow  # builds four TRL trainers

ROWS = [
    {"prompt": "red cat sat on the mat", "chosen": "blue dog", "rejected": "green mat on the one two three"},
    {"prompt": "hello world", "chosen": "one two three four five six", "rejected": "the cat"},
    {"conversations": [{"from": "human", "value": "name a city"}, {"from": "gpt", "value": "red city"},
                       {"from": "human", "value": "and a dog"}], "chosen": {"from": "gpt", "value": "blue dog is a dog"},
     "rejected": {"from": "gpt", "value": "reverse letters"}},
    {"chosen": "\n\nHuman: what is one and two\n\nAssistant: three", "rejected": "\n\nHuman: what is one and two\n\nAssistant: the dog sat on a mat"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("pref")
    cfg = DataConfig.model_validate({"train": [{"path": str(tiny.write_jsonl(tmp / "p.jsonl", ROWS))}], "eval_split": 0.0,
                                     "cache_dir": str(tmp / "cache")})
    pairs = prepare(cfg, tokenizer).pairs
    ref = AutoModelForCausalLM.from_pretrained(llama_dir)
    policy = copy.deepcopy(ref)
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that differs from its reference, so every term of every loss is non-trivial
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy.train(), ref.eval()
    return pairs, policy, ref, tokenizer, tmp


def _logps(model, batch):
    with torch.no_grad():
        return sequence_logps(forward(model, batch), batch)


def _trl_args(cls, tmp, **kw):
    return cls(output_dir=str(tmp / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=2, **kw)


def _text_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "red cat", "chosen": " blue", "rejected": " green"}] * 2)


def test_masks_are_exactly_the_completion_and_its_end_token(setup):
    pairs, _, _, tok, _ = setup
    assert len(pairs) == 4
    for p in pairs:
        for c in (p.chosen_completion, p.rejected_completion):
            assert all(lab == i for i, lab in zip(c.ids, c.labels))  # every completion token is trained
        assert tok.decode(p.chosen_completion.ids).endswith("<|im_end|>")
        assert tok.decode(p.prompt_ids).endswith("<|im_start|>assistant\n")
        assert p.chosen.labels[: len(p.prompt_ids)] == [IGNORE] * len(p.prompt_ids)
    assert tok.decode(pairs[0].chosen_completion.ids) == "blue dog<|im_end|>"
    assert tok.decode(pairs[3].rejected_completion.ids) == "the dog sat on a mat<|im_end|>"


@pytest.mark.parametrize("packed", [False, True])
def test_dpo_losses_equal_trl(setup, packed):
    from trl import DPOConfig, DPOTrainer

    pairs, policy, ref, tok, tmp = setup
    trainer = DPOTrainer(model=policy, ref_model=ref, args=_trl_args(DPOConfig, tmp), train_dataset=_text_dataset(), processing_class=tok)
    trl_batch = trainer.data_collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_completion.ids,
                                        "rejected_ids": p.rejected_completion.ids} for p in pairs])
    ours = collate_pairs(pairs, tok.pad_token_id, packed)
    logps, counts = _logps(policy, ours)
    ref_logps, _ = _logps(ref, ours)
    n = len(pairs)
    for loss_type, eps in (("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0), ("hinge", 0.0)):
        trainer.loss_types, trainer.label_smoothing, trainer.beta = [loss_type], eps, 0.3
        trainer._metrics["train"].clear()
        with torch.no_grad():
            expected = trainer._compute_loss(trainer.model, trl_batch, False)
        got = pl.dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], 0.3, loss_type, eps, counts[:n], counts[n:])
        assert abs(got.losses.mean().item() - expected.item()) <= 1e-5, loss_type
        m = trainer._metrics["train"]
        assert abs(got.chosen_rewards.mean().item() - m["rewards/chosen"][-1]) <= 1e-5
        assert abs(got.rejected_rewards.mean().item() - m["rewards/rejected"][-1]) <= 1e-5
        assert abs(logps[:n].mean().item() - m["logps/chosen"][-1]) <= 1e-4
    assert expected.item() > 0.05  # the policy differs from the reference: not the trivial log(2)/1.0 value


def test_cdpo_label_smoothing_is_the_conservative_mixture():
    d = torch.tensor([0.7, -1.2])
    z = torch.zeros(2)
    got = pl.dpo_loss(d, z, z, z, beta=0.5, label_smoothing=0.2).losses
    want = -0.8 * torch.nn.functional.logsigmoid(0.5 * d) - 0.2 * torch.nn.functional.logsigmoid(-0.5 * d)
    assert torch.allclose(got, want)


def _pair_batch(pairs):
    """TRL's experimental ORPO/CPO batch layout: {side}_input_ids / attention_mask / labels, right-padded."""
    from trl.trainer.utils import pad

    out = {}
    for side in ("chosen", "rejected"):
        enc = [getattr(p, side) for p in pairs]
        t = lambda rows, v: pad([torch.tensor(r) for r in rows], padding_value=v)  # noqa: E731
        out[f"{side}_input_ids"] = t([e.input_ids for e in enc], 0)
        out[f"{side}_attention_mask"] = t([[1] * len(e.input_ids) for e in enc], 0)
        out[f"{side}_labels"] = t([e.labels for e in enc], IGNORE)
    return out


def test_orpo_loss_equals_trl(setup):
    import warnings

    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    pairs, policy, _, tok, tmp = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=policy, args=_trl_args(ORPOConfig, tmp, beta=0.25, max_length=64), train_dataset=_text_dataset(),
                              processing_class=tok)
    with torch.no_grad():
        expected, metrics = trainer.get_batch_loss_metrics(trainer.model, _pair_batch(pairs))
    n = len(pairs)
    ours = collate_pairs(pairs, tok.pad_token_id, packed=False)
    with torch.no_grad():
        logits = forward(policy, ours)
    logps, counts = sequence_logps(logits, ours)
    got = pl.orpo_loss(logps[:n] / counts[:n], logps[n:] / counts[n:], 0.25)
    # TRL's ORPO takes the NLL term over prompt + chosen (its labels = every attended token); the same mask here.
    chosen_ids = ours["input_ids"][:n]
    nll_targets = torch.where(ours["attention_mask"][:n] == 1, chosen_ids, IGNORE)[:, 1:]
    nll_logps = pl.token_logps(logits[:n, :-1], nll_targets)
    nll = -nll_logps.sum() / (nll_targets != IGNORE).sum()
    assert abs((nll + got.losses.mean()).item() - expected.item()) <= 1e-5
    assert abs(got.chosen_rewards.mean().item() - metrics["rewards/chosen"]) <= 1e-5
    assert abs(pl.orpo_log_odds(logps[:n] / counts[:n], logps[n:] / counts[n:]).mean().item() - metrics["log_odds_chosen"]) <= 1e-5


def test_simpo_loss_equals_trl(setup):
    import warnings

    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pairs, policy, _, tok, tmp = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = _trl_args(CPOConfig, tmp, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7, label_smoothing=0.1, max_length=64)
        trainer = CPOTrainer(model=policy, args=args, train_dataset=_text_dataset(), processing_class=tok)
    with torch.no_grad():
        expected, metrics = trainer.get_batch_loss_metrics(trainer.model, _pair_batch(pairs))
    n = len(pairs)
    logps, counts = _logps(policy, collate_pairs(pairs, tok.pad_token_id, packed=True))
    got = pl.simpo_loss(logps[:n] / counts[:n], logps[n:] / counts[n:], beta=2.0, gamma=0.7, label_smoothing=0.1)
    assert abs(got.losses.mean().item() - expected.item()) <= 1e-5
    assert abs(got.rejected_rewards.mean().item() - metrics["rewards/rejected"]) <= 1e-5


def test_kto_loss_equals_trl(setup):
    from trl import KTOConfig, KTOTrainer

    pairs, policy, ref, tok, tmp = setup
    examples = pairs_to_unpaired(pairs)  # chosen desirable, rejected undesirable
    examples = examples[::2][:3] + examples[1::2]  # unbalanced: 3 desirable, 4 undesirable
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "red cat", "completion": " blue", "label": True}, {"prompt": "red", "completion": " g", "label": False}])
    args = _trl_args(KTOConfig, tmp, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trl_batch = trainer.data_collator([{"prompt_ids": e.prompt_ids, "completion_ids": e.completion.ids, "label": e.desirable,
                                        "KL_completion_ids": examples[i - 1].completion.ids} for i, e in enumerate(examples)])
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, trl_batch, False)
    ours = collate_unpaired(examples, tok.pad_token_id, packed=False)
    logps, _ = _logps(policy, ours)
    ref_logps, _ = _logps(ref, ours)
    kl = pl.kto_kl(_logps(policy, ours["kl"])[0], _logps(ref, ours["kl"])[0]).clamp(min=0)
    got = pl.kto_loss(logps, ref_logps, ours["desirable"], kl, 0.2, 1.3, 0.8)
    assert abs(got.losses.mean().item() - expected.item()) <= 1e-5
    m = trainer._metrics["train"]
    assert abs(kl.item() - m["kl"][-1]) <= 1e-5
    assert abs(got.chosen_rewards.mean().item() - m["rewards/chosen"][-1]) <= 1e-5
    assert abs(got.rejected_rewards.mean().item() - m["rewards/rejected"][-1]) <= 1e-5
