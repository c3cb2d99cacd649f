"""Preference data: formats (prompt + chosen/rejected, ShareGPT/OpenAI conversations, hh-rlhf transcripts,
KTO rows), shared prompt tokens, completion masks, the truncation rule and its counts, bad pairs via
on_bad_row, the cache, `data inspect`, and the errors that point to train.method."""

import json

import pytest

import tiny
from helpers import assert_user_error, run_cli, write_config
from tuneforge.config.schema import DataConfig
from tuneforge.data.preference import Pair, Unpaired
from tuneforge.data.prepare import prepare
from tuneforge.data.render import IGNORE
from tuneforge.errors import UserError


def prep(tmp_path, tokenizer, rows, **kw):
    kw.setdefault("eval_split", 0.0)
    cfg = DataConfig.model_validate({"train": [{"path": str(tiny.write_jsonl(tmp_path / "p.jsonl", rows))}],
                                     "cache_dir": str(tmp_path / "cache"), **kw})
    return prepare(cfg, tokenizer)


def trained(tok, c) -> str:
    return tok.decode([t for t, lab in zip(c.ids, c.labels) if lab != IGNORE])


def test_every_pair_format_shares_the_prompt_and_masks_only_the_completion(tmp_path, tokenizer):
    rows = [
        {"prompt": "red cat", "chosen": "blue dog", "rejected": "green mat"},
        {"prompt": [{"role": "system", "content": "one"}, {"role": "user", "content": "two"}],
         "chosen": [{"role": "assistant", "content": "three"}], "rejected": [{"role": "assistant", "content": "four"}]},
        {"conversations": [{"from": "human", "value": "hello"}], "chosen": {"from": "gpt", "value": "world"},
         "rejected": {"from": "gpt", "value": "the end"}},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: and?\n\nAssistant: blue",
         "rejected": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: and?\n\nAssistant: red"},
    ]
    data = prep(tmp_path, tokenizer, rows)
    assert [type(p) for p in data.pairs] == [Pair] * 4
    got = [(trained(tokenizer, p.chosen_completion), trained(tokenizer, p.rejected_completion)) for p in data.pairs]
    assert got == [("blue dog<|im_end|>", "green mat<|im_end|>"), ("three<|im_end|>", "four<|im_end|>"),
                   ("world<|im_end|>", "the end<|im_end|>"), ("blue<|im_end|>", "red<|im_end|>")]
    hh = data.pairs[3]
    assert tokenizer.decode(hh.prompt_ids) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
                                               "<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")
    for p in data.pairs:  # one rendered prompt, both completions continue the same tokens
        assert p.chosen.input_ids[: len(p.prompt_ids)] == p.rejected.input_ids[: len(p.prompt_ids)] == p.prompt_ids
        assert set(p.chosen.labels[: len(p.prompt_ids)]) == {IGNORE}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "blue dog"}], tokenize=False)
    full = tokenizer(text, add_special_tokens=False).input_ids
    assert full[: len(data.pairs[0].chosen.input_ids)] == data.pairs[0].chosen.input_ids  # same tokens as one render
    assert data.report["preference"]["pairs"] == 4 and data.report["preference_pairs"] == 4


def test_kto_rows_and_the_cache(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "red"}, {"role": "assistant", "content": "blue"}], "label": True},
            {"prompt": "red", "completion": "green", "label": False},
            {"prompt": "one", "chosen": "two", "rejected": "three"}]
    data = prep(tmp_path, tokenizer, rows)
    kto = [x for x in data.pairs if isinstance(x, Unpaired)]
    assert [(trained(tokenizer, x.completion), x.desirable) for x in kto] == [("blue<|im_end|>", True), ("green<|im_end|>", False)]
    assert data.report["preference"]["kto_rows"] == 2 and data.report["preference"]["kto_desirable"] == 1
    again = prep(tmp_path, tokenizer, rows)
    assert again.cache_hit and again.pairs == data.pairs


def test_eval_pairs_are_held_out(tmp_path, tokenizer):
    rows = [{"prompt": f"red {i}", "chosen": "blue", "rejected": "green"} for i in range(20)]
    data = prep(tmp_path, tokenizer, rows, eval_size=5)
    assert len(data.pairs) == 15 and len(data.eval_pairs) == 5
    assert not {p.prompt[0]["content"] for p in data.pairs} & {p.prompt[0]["content"] for p in data.eval_pairs}
    assert data.report["preference"]["train"] == 15 and data.report["preference"]["eval"] == 5


def test_bad_pairs_follow_on_bad_row_with_counts(tmp_path, tokenizer):
    rows = [{"prompt": "red cat", "chosen": "blue", "rejected": "green"},
            {"prompt": "red cat", "rejected": "green"},  # missing chosen
            {"prompt": "one", "chosen": "", "rejected": "two"},  # empty chosen
            {"prompt": "one two", "chosen": "same", "rejected": "same"},  # identical
            {"prompt": "the cat sat on the mat " * 20, "chosen": "blue", "rejected": "green"}]  # prompt > max_length
    data = prep(tmp_path, tokenizer, rows, on_bad_row="skip", max_length=48, pair_truncation="completion_first")
    assert len(data.pairs) == 1
    assert data.report["dropped"] == {"missing chosen": 2, "chosen and rejected are identical": 1, "prompt longer than max_length": 1}
    with pytest.raises(UserError, match="chosen and rejected are identical"):
        prep(tmp_path / "e", tokenizer, rows[3:4])


def test_truncation_rule_prompt_first_or_completion_first(tmp_path, tokenizer):
    rows = [{"prompt": "the cat sat on the mat " * 6, "chosen": "blue dog " * 10, "rejected": "red"}]
    long_prompt = prep(tmp_path / "a", tokenizer, rows + [{"prompt": "red", "chosen": "blue", "rejected": "green"}], max_length=40,
                       on_bad_row="skip", pair_truncation="completion_first")
    assert long_prompt.report["dropped"] == {"prompt longer than max_length": 1}  # completion_first keeps the prompt whole
    cut = prep(tmp_path / "b", tokenizer, rows, max_length=40, pair_truncation="prompt_first")
    p = cut.pairs[0]
    assert cut.report["preference"]["truncated_prompt"] == 1 and cut.report["preference"]["truncated_completion"] == 1
    assert len(p.chosen.input_ids) == 40 and len(p.prompt_ids) == 20  # the prompt keeps max_length/2, its end
    assert tokenizer.decode(p.prompt_ids).endswith("<|im_start|>assistant\n")
    fits = prep(tmp_path / "c", tokenizer, [{"prompt": "red", "chosen": "blue dog " * 20, "rejected": "red"}], max_length=40)
    assert fits.report["preference"]["truncated_completion"] == 1 and len(fits.pairs[0].chosen.input_ids) == 40
    assert fits.report["preference"]["truncated_prompt"] == 0


def test_a_prompt_longer_than_max_length_keeps_its_end_by_default(tmp_path, tokenizer):
    # Like SFT (cut and counted), not a stopped run: the default keeps the prompt's newest tokens, as TRL's keep_end.
    rows = [{"prompt": "the cat sat on the mat " * 12, "chosen": "blue dog", "rejected": "red"},
            {"prompt": "red", "chosen": "blue", "rejected": "green"}]
    data = prep(tmp_path, tokenizer, rows, max_length=40)
    long = next(p for p in data.pairs if "cat" in p.prompt[0]["content"])
    assert len(long.prompt_ids) == 20 and tokenizer.decode(long.prompt_ids).endswith("mat <|im_end|>\n<|im_start|>assistant\n")
    assert trained(tokenizer, long.chosen_completion) == "blue dog<|im_end|>" and len(long.chosen.input_ids) <= 40
    assert data.report["preference"]["truncated_prompt"] == 1 and data.report["truncated"] == 1 and len(data.pairs) == 2
    with pytest.raises(UserError, match="prompt longer than max_length"):  # the error stays an option
        prep(tmp_path / "e", tokenizer, rows, max_length=40, pair_truncation="completion_first")


def test_inspect_shows_prompt_chosen_and_rejected(tmp_path, llama_dir):
    rows = [{"prompt": "red cat", "chosen": "blue dog", "rejected": "green mat"}] * 2
    cfg = write_config(tmp_path / "c.yaml", llama_dir, tiny.write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run")
    proc = run_cli("data", "inspect", cfg, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)  # one pair: the duplicate row is dropped by dedup
    assert row["prompt"].endswith("red cat<|im_end|>\n<|im_start|>assistant\n")
    assert (row["chosen"]["text"], row["rejected"]["text"]) == ("blue dog<|im_end|>", "green mat<|im_end|>")
    text = run_cli("data", "inspect", cfg).stdout
    assert "prompt:" in text and "chosen: blue dog" in text and "rejected: green mat" in text


def test_method_without_pairs_and_pairs_without_method_are_clear_errors(tmp_path, llama_dir):
    sft = write_config(tmp_path / "s.yaml", llama_dir, tiny.write_jsonl(tmp_path / "s.jsonl", tiny.reverse_rows(8)), tmp_path / "r1",
                       train={"method": "dpo", "max_steps": 1})
    assert_user_error(run_cli("train", sft), "train.method dpo needs preference pairs")
    rows = [{"prompt": f"red {i}", "chosen": "blue", "rejected": "green"} for i in range(8)]
    pref = write_config(tmp_path / "p.yaml", llama_dir, tiny.write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "r2")
    assert_user_error(run_cli("train", pref), "preference pairs", "train.method: dpo")
