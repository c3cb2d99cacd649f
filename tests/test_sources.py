"""Sources (jsonl, json, csv, tsv, parquet, txt, directories), formats and built-in templates."""

import json

import pytest

from tuneforge.config.schema import DataConfig
from tuneforge.data.prepare import prepare
from tuneforge.data.render import IGNORE, encode
from tuneforge.data.templates import builtin_names, resolve_template
from tuneforge.errors import UserError


def prep(tmp_path, tokenizer, *specs, **kw):
    cfg = DataConfig.model_validate({"train": list(specs), "eval_split": 0.0, "cache_dir": str(tmp_path / "cache"), **kw})
    return prepare(cfg, tokenizer)


def trained(tok, s):
    return tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE])


def test_csv_with_column_map(tmp_path, tokenizer):
    (tmp_path / "qa.csv").write_text('question,answer\n"what is one and two","three"\nhello,world\n')
    data = prep(tmp_path, tokenizer, {"path": str(tmp_path / "qa.csv"), "columns": {"question": "prompt", "answer": "completion"}})
    assert [s.messages for s in data.train] == [
        [{"role": "user", "content": "what is one and two"}, {"role": "assistant", "content": "three"}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]]
    assert trained(tokenizer, data.train[1]) == "world<|im_end|>"


def test_tsv_parquet_and_directory(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "a.tsv").write_text("input\toutput\nred\tblue\n")
    pq.write_table(pa.table({"prompt": ["cat"], "completion": ["dog"]}), folder / "b.parquet")
    (folder / "c.jsonl").write_text(json.dumps({"instruction": "say", "output": "hi"}) + "\n")
    data = prep(tmp_path, tokenizer, {"path": str(folder)})
    assert [s.messages[-1]["content"] for s in data.train] == ["blue", "dog", "hi"]
    assert data.report["rows_read"] == 3


def test_txt_corpus_trains_every_token(tmp_path, tokenizer):
    (tmp_path / "doc.txt").write_text("the cat sat\non the mat\n\nred blue\n")
    by_line = prep(tmp_path, tokenizer, {"path": str(tmp_path / "doc.txt"), "text_unit": "line"})
    assert [s.messages for s in by_line.train] == ["the cat sat", "on the mat", "red blue"]
    s = by_line.train[0]
    assert s.labels == s.input_ids and s.input_ids[-1] == tokenizer.eos_token_id
    whole = prep(tmp_path, tokenizer, {"path": str(tmp_path / "doc.txt")})
    assert len(whole.train) == 1


def test_unsupported_file_type_is_a_user_error(tmp_path, tokenizer):
    (tmp_path / "x.xlsx").write_text("nope")
    with pytest.raises(UserError, match="unsupported file type '.xlsx'"):
        prep(tmp_path, tokenizer, {"path": str(tmp_path / "x.xlsx")})


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "red cat"},
        {"role": "assistant", "content": "blue dog"}, {"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_templates_mask_only_assistant_replies(name, tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = resolve_template(name)
    text, enc = encode(tok, CONV, "assistant", 4096)
    out = trained(tok, enc)
    assert "blue dog" in out and "three" in out
    assert "red cat" not in out and "one two" not in out and "Be brief" not in out
    assert out.rstrip().endswith(("<|im_end|>", "<end_of_turn>", "<|end|>", "<|eot_id|>")), out
    prompt = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert "red cat" in prompt


def test_builtin_template_names():
    assert set(builtin_names()) >= {"alpaca", "chatml", "gemma", "llama2", "llama3", "mistral", "phi3", "vicuna"}
