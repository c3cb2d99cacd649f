"""Data layer: SQL, HTML, HF datasets, custom datasets, OASST, preference pairs, tool calls, cleaning,
mixing, corpus blocks, splits, multi-process encoding."""

import json
import sqlite3
from collections import Counter

import pytest

import tiny
from conftest import FIXTURES
from tuneforge.config.schema import CleanConfig, DataConfig
from tuneforge.data import clean as cl
from tuneforge.data.prepare import padding_efficiency, prepare
from tuneforge.data.registry import register_dataset
from tuneforge.data.render import IGNORE
from tuneforge.errors import UserError


def prep(tmp_path, tokenizer, specs, **kw):
    if "eval_size" not in kw:  # eval_size and eval_split together are a config error
        kw.setdefault("eval_split", 0.0)
    cfg = DataConfig.model_validate({"train": specs, "cache_dir": str(tmp_path / "cache"), **kw})
    return prepare(cfg, tokenizer)


def trained(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def test_sqlite_database_and_sql_dump(tmp_path, tokenizer):
    db = tmp_path / "faq.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE faq (question TEXT, answer TEXT)")
    con.executemany("INSERT INTO faq VALUES (?, ?)", [("red cat", "blue dog"), ("one", "two")])
    con.commit()
    con.close()
    query = "SELECT question AS prompt, answer AS completion FROM faq ORDER BY rowid"
    data = prep(tmp_path, tokenizer, [{"path": str(db), "query": query}])
    assert [s.messages[-1]["content"] for s in data.train] == ["blue dog", "two"]
    dump = tmp_path / "faq.sql"
    dump.write_text("CREATE TABLE faq (question TEXT, answer TEXT);\nINSERT INTO faq VALUES ('hello', 'world');\n")
    assert prep(tmp_path, tokenizer, [{"path": str(dump), "query": query}]).train[0].messages[-1]["content"] == "world"
    with pytest.raises(UserError, match="need a query"):
        prep(tmp_path, tokenizer, [{"path": str(db)}])
    with pytest.raises(UserError, match="no such table: nope"):
        prep(tmp_path, tokenizer, [{"path": str(db), "query": "SELECT * FROM nope"}])


def test_html_main_text_without_boilerplate(tmp_path, tokenizer):
    body = " ".join(f"The river otter sentence number {i} describes how otters hunt fish in cold water." for i in range(12))
    (tmp_path / "page.html").write_text(
        "<html><head><title>Otters</title></head><body><nav><a href='/'>Home</a> | <a href='/about'>About us</a></nav>"
        f"<article><h1>Otters</h1><p>{body}</p></article><footer>Copyright 2026 Example Corp. Cookie settings.</footer></body></html>")
    data = prep(tmp_path, tokenizer, [{"path": str(tmp_path / "page.html")}])
    text = data.train[0].messages
    assert "otters hunt fish" in text and "About us" not in text and "Cookie settings" not in text


def test_hf_save_to_disk_directory(tmp_path, tokenizer):
    import datasets

    rows = [{"instruction": f"say {w}", "output": w} for w in ("red", "blue", "green")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "ds")
    data = prep(tmp_path, tokenizer, [{"path": str(tmp_path / "ds"), "split": "test"}])
    assert [s.messages[-1]["content"] for s in data.train] == ["red"]
    with pytest.raises(UserError, match="no split 'validation'"):
        prep(tmp_path, tokenizer, [{"path": str(tmp_path / "ds"), "split": "validation"}])


def test_custom_datasets_by_name_class_and_module_path(tmp_path, tokenizer):
    @register_dataset("test-colours")
    class Colours:
        def __len__(self):
            return 2

        def get_sample(self, i):
            return {"prompt": f"colour {i}", "completion": ["red", "blue"][i]}

    data = prep(tmp_path, tokenizer, [{"custom": "test-colours"}, {"custom": "custom_data:get_data", "options": {"n": 2}}], allow_code=True)
    assert [s.messages[-1]["content"] for s in data.train] == ["red", "blue", "1", "2"]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("test-colours")(lambda: [])
    with pytest.raises(UserError, match="not registered"):
        prep(tmp_path, tokenizer, [{"custom": "nope"}])


def test_oasst_tree_follows_best_ranked_replies(tmp_path, tokenizer):
    tree = {"prompt": {"text": "q1", "role": "prompter", "replies": [
        {"text": "worse", "role": "assistant", "rank": 1, "replies": []},
        {"text": "best", "role": "assistant", "rank": 0, "replies": [
            {"text": "q2", "role": "prompter", "replies": [{"text": "a2", "role": "assistant", "rank": 0, "replies": []}]}]}]}}
    data = prep(tmp_path, tokenizer, [{"path": str(tiny.write_jsonl(tmp_path / "t.jsonl", [tree]))}])
    assert [m["content"] for m in data.train[0].messages] == ["q1", "best", "q2", "a2"]


def test_preference_pairs_train_only_the_response(tmp_path, tokenizer):
    rows = [{"prompt": "red cat", "chosen": "blue dog", "rejected": "green mat"},
            {"chosen": "\n\nHuman: hello\n\nAssistant: one two", "rejected": "\n\nHuman: hello\n\nAssistant: three"}]
    data = prep(tmp_path, tokenizer, [{"path": str(tiny.write_jsonl(tmp_path / "p.jsonl", rows))}])
    assert len(data.pairs) == 2 and not data.train and data.report["preference_pairs"] == 2
    p = data.pairs[0]
    assert trained(tokenizer, p.chosen.input_ids, p.chosen.labels) == "blue dog<|im_end|>"
    assert trained(tokenizer, p.rejected.input_ids, p.rejected.labels) == "green mat<|im_end|>"
    assert data.pairs[1].prompt == [{"role": "user", "content": "hello"}]
    again = prep(tmp_path, tokenizer, [{"path": str(tmp_path / "p.jsonl")}])
    assert again.cache_hit and again.pairs[0].chosen.labels == p.chosen.labels


def test_tool_calls_with_a_tool_capable_template(tmp_path):
    folder = FIXTURES / "tokenizers" / "qwen2.5-instruct"
    if not folder.is_dir():
        pytest.skip("fixture tokenizer qwen2.5-instruct not present")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    row = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                             {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
                             {"from": "observation", "value": json.dumps({"temp": 3})},
                             {"from": "gpt", "value": "It is 3 degrees in Oslo."}],
           "tools": json.dumps([{"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])}
    data = prep(tmp_path, tok, [{"path": str(tiny.write_jsonl(tmp_path / "t.jsonl", [row]))}])
    s = data.train[0]
    msgs, tools = s.messages["messages"], s.messages["tools"]
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == s.input_ids
    out = trained(tok, s.input_ids, s.labels)
    assert "get_weather" in out and '"city": "Oslo"' in out and "It is 3 degrees in Oslo.<|im_end|>" in out
    assert "temp" not in out and "Weather in Oslo?" not in out


def test_tool_calls_rejected_by_a_template_without_tools(tmp_path, tokenizer):
    row = {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                             {"from": "observation", "value": "1"}, {"from": "gpt", "value": "done"}], "tools": "[]"}
    with pytest.raises(UserError, match="does not support tool calls"):
        prep(tmp_path, tokenizer, [{"path": str(tiny.write_jsonl(tmp_path / "t.jsonl", [row]))}])


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_cleaning_steps_each_report_what_they_removed():
    long = ("The committee met on Tuesday to review the budget for the new library, and after a long discussion "
            "about heating costs, staff salaries and the price of books, the members agreed to postpone the final vote "
            "until the next meeting so that the treasurer could prepare a more detailed report for everyone.")
    items = [conv("Hello there, how are you doing today?", "I am fine, thank you."),
             conv("hello  there, how are you doing TODAY?", "I am fine, thank you."),  # exact dup after normalising
             conv(long, "The vote was postponed."), conv(long.replace("Tuesday", "Monday"), "The vote was postponed."),  # near dup
             conv("tell me", "As an AI language model, I cannot."),
             conv("Wie spät ist es heute in Berlin und wann fährt der nächste Zug?", "Es ist acht Uhr, der Zug fährt um neun."),
             conv("What time is it in London and when is the next train?", "It is eight, the train leaves at nine.")]
    removed = Counter()
    cfg = CleanConfig(near_dedup=0.8, drop_refusals=True, languages=["en"])
    kept = cl.clean(items, cfg, 0, removed)
    assert removed == Counter({"exact duplicate": 1, "near duplicate": 1, "refusal / boilerplate phrase": 1, "language de": 1})
    assert len(kept) == 3


def test_cluster_cap_keeps_topics_balanced():
    topics = {"cats": "cat kitten meow whiskers purr", "cars": "engine wheel brake gearbox fuel", "cakes": "flour sugar oven bake icing"}
    items = [conv(f"{words} {i}", f"{words.split()[0]} {i}") for words in topics.values() for i in range(10)]
    removed = Counter()
    kept = cl.cap_clusters(items, 3, 2, 0, removed)
    assert len(kept) == 6 and removed["over cluster cap"] == 24
    assert Counter(k[0]["content"].split()[0] for k in kept) == Counter({"cat": 2, "engine": 2, "flour": 2})


def test_token_length_filters_mixing_and_eval_size(tmp_path, tokenizer):
    a = tiny.write_jsonl(tmp_path / "a.jsonl", tiny.reverse_rows(10, seed=1))
    b = tiny.write_jsonl(tmp_path / "b.jsonl", tiny.reverse_rows(4, seed=2))
    data = prep(tmp_path, tokenizer, [{"path": str(a), "samples": 5}, {"path": str(b), "weight": 2.0}], eval_size=3,
                clean={"dedup": False, "min_tokens": 1})
    assert [d["used"] for d in data.report["datasets"]] == [5, 8]
    assert len(data.eval) == 3 and len(data.train) == 10
    lengths = sorted(len(s.input_ids) for s in prep(tmp_path, tokenizer, [{"path": str(a)}]).train)
    cut = lengths[len(lengths) // 2]
    short = prep(tmp_path, tokenizer, [{"path": str(a)}], clean={"max_tokens": cut})
    assert 0 < len(short.train) < 10
    assert short.report["dropped"] == {f"longer than clean.max_tokens ({cut})": 10 - len(short.train)}
    assert all(len(s.input_ids) <= cut for s in short.train)


def test_group_texts_blocks(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("\n".join(tiny.corpus(50)))
    data = prep(tmp_path, tokenizer, [{"path": str(tmp_path / "c.txt"), "text_unit": "line"}], group_texts=True, block_size=32)
    assert data.train and all(len(s.input_ids) == 32 and s.labels == s.input_ids for s in data.train)
    assert data.report["train_tokens"] == 32 * len(data.train)
    from tuneforge.data.inspect import _text

    again = prep(tmp_path, tokenizer, [{"path": str(tmp_path / "c.txt"), "text_unit": "line"}], group_texts=True, block_size=32)
    assert again.cache_hit and again.train[0].messages is None  # a block has no source item ...
    first = tiny.corpus(50)[0]
    assert _text(again.train[0], tokenizer, "all").startswith(first[:20])  # ... inspect shows its decoded text


def test_multiprocess_encoding_matches_single_process(tmp_path, tokenizer):
    path = tiny.write_jsonl(tmp_path / "big.jsonl", tiny.reverse_rows(2400, seed=5))
    one = prep(tmp_path / "a", tokenizer, [{"path": str(path)}], clean={"dedup": False})
    two = prep(tmp_path / "b", tokenizer, [{"path": str(path)}], clean={"dedup": False}, num_proc=2)
    assert one.fingerprint == two.fingerprint  # num_proc does not change the data
    assert [s.labels for s in one.train] == [s.labels for s in two.train] and len(one.train) == 2400


def test_padding_efficiency():
    assert padding_efficiency([10, 10, 10, 10], 2) == 1.0
    assert padding_efficiency([10, 30], 2) == round(40 / 60, 4)


STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def test_pipelined_chunks_with_a_rejected_row_match_one_by_one_encoding(tmp_path, tokenizer, monkeypatch):
    from tuneforge.data import render

    monkeypatch.setattr(render, "CHUNK", 4)  # several chunks in flight, the bad row inside the second
    monkeypatch.setattr(tokenizer, "chat_template", STRICT)
    rows = tiny.reverse_rows(10, seed=3)
    rows.insert(5, {"messages": [{"role": "user", "content": "a b"}, {"role": "user", "content": "c d"}, {"role": "assistant", "content": "e"}]})
    path = tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    data = prep(tmp_path, tokenizer, [{"path": str(path)}], on_bad_row="skip", clean={"dedup": False})
    assert len(data.train) == 10
    assert data.report["dropped"] == {"the chat template rejected this conversation": 1}
    for s, row in zip(data.train, rows[:5] + rows[6:]):
        _, enc = render.encode(tokenizer, row["messages"], "assistant", 1024)
        assert (s.input_ids, s.labels) == (enc.input_ids, enc.labels)
    with pytest.raises(UserError, match="rejected this conversation.*roles must alternate"):
        prep(tmp_path / "e", tokenizer, [{"path": str(path)}], clean={"dedup": False})
