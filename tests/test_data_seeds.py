"""Data layer items of the seed workflows (issue 21) and SQL sources (issue 20): the prepared data written as
cleaned/train/val JSONL and pushed as a Hub dataset, datasets registered by an installed package's entry point,
SQLite sources that reach no other file, JSON rows that used to crash or be cut in two, the report's stable
`truncated` / `skipped` counts, and progress lines for long phases."""

import hashlib
import json
import sqlite3

import pytest
from pydantic import ValidationError

import tiny
from helpers import assert_user_error, run_cli, run_cli_inprocess, write_config
from tuneforge.config.schema import DataConfig
from tuneforge.data import prepare as prepare_module
from tuneforge.data.prepare import prepare
from tuneforge.errors import UserError


def prep(tmp_path, tokenizer, specs, _log=lambda *_: None, **kw):
    if "eval_size" not in kw:
        kw.setdefault("eval_split", 0.0)
    cfg = DataConfig.model_validate({"train": specs, "cache_dir": str(tmp_path / "cache"), **kw})
    return prepare(cfg, tokenizer, log=_log)


def jsonl_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# ---- JSON rows -------------------------------------------------------------------------------------------


def test_jsonl_rows_split_at_newline_only(tmp_path, tokenizer):
    # json.dumps(ensure_ascii=False) writes U+2028, U+0085, U+001C.. raw inside strings: the rows are valid JSONL.
    odd = "one\u2028two\x85three\x1cfour\x0cfive"
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [chat(odd, "ok " + odd), chat("b", "c")]) + "\r\n",
                    encoding="utf-8")
    data = prep(tmp_path, tokenizer, [{"path": str(path)}])
    assert [s.messages[0]["content"] for s in data.train] == [odd, "b"]
    assert data.report["rows_read"] == 2


def test_huge_json_number_and_lone_surrogate_are_one_line(tmp_path, llama_dir):
    good = json.dumps(chat("a", "b"))
    big = tmp_path / "big"
    big.mkdir()
    cfg = write_config(big / "c.yaml", llama_dir, big / "t.jsonl", big / "run")
    (big / "t.jsonl").write_text(good + "\n" + '{"messages": [], "n": ' + "7" * 5000 + "}\n")
    assert_user_error(run_cli_inprocess("prepare", cfg), "t.jsonl row 2", "4300 digits", "quote it as a string")
    (big / "t.json").write_text("[" + good + ', {"n": ' + "7" * 5000 + "}]")
    cfg = write_config(big / "c2.yaml", llama_dir, big / "t.json", big / "run2")
    assert_user_error(run_cli_inprocess("prepare", cfg), "t.json", "4300 digits")

    sur = tmp_path / "sur"
    sur.mkdir()
    rows = [good, '{"messages": [{"role": "user", "content": "x\\ud800y"}, {"role": "assistant", "content": "z"}]}',
            '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}, {"role": "assistant", "content": "ok"}]}']
    (sur / "t.jsonl").write_text("\n".join(rows) + "\n")
    cfg = write_config(sur / "c.yaml", llama_dir, sur / "t.jsonl", sur / "run")
    assert_user_error(run_cli_inprocess("prepare", cfg), "t.jsonl row 2", "lone UTF-16 surrogate", "on_bad_row")


def test_report_counts_truncated_and_skipped_under_stable_keys(tmp_path, tokenizer):
    rows = [chat("a", "b"), chat("a b", "answer " * 60),
            json.loads('{"messages": [{"role": "user", "content": "x\\ud800"}, {"role": "assistant", "content": "z"}]}'),
            {"foo": 1},
            {"prompt": "the cat sat on the mat " * 12, "chosen": "blue", "rejected": "green"}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # the surrogate as a file holds it: an escape
    data = prep(tmp_path, tokenizer, [{"path": str(path)}], on_bad_row="skip", max_length=48)
    assert data.report["skipped"] == {"a lone UTF-16 surrogate": 1, "cannot detect the format from keys ['foo']": 1}
    assert data.report["truncated"] == 2  # one SFT sample and one pair (its prompt fills max_length: keep_end)
    assert data.report["preference"]["truncated_prompt"] == 1
    assert data.report["train_samples"] == 2 and data.report["preference_pairs"] == 1


# ---- SQLite sources --------------------------------------------------------------------------------------


def faq_db(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE faq (question TEXT, answer TEXT)")
    con.executemany("INSERT INTO faq VALUES (?, ?)", [("red cat", "blue dog"), ("one", "two")])
    con.commit()
    con.close()
    return path


def test_sqlite_sources_reach_no_other_file(tmp_path, tokenizer):
    query = "SELECT question AS prompt, answer AS completion FROM faq"
    outside = tmp_path / "outside.db"
    dump = tmp_path / "faq.sql"
    dump.write_text(f"CREATE TABLE faq (question TEXT, answer TEXT);\nINSERT INTO faq VALUES ('a', 'b');\n"
                    f"ATTACH DATABASE '{outside}' AS o;\nCREATE TABLE o.t (x);\n")
    with pytest.raises(UserError, match=r"faq\.sql: the SQL dump does not load .*not authorized.*ATTACH"):
        prep(tmp_path, tokenizer, [{"path": str(dump), "query": query}])
    db = faq_db(tmp_path / "odd?name#1.db")  # characters a file: URI would read as its query or fragment
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert [s.messages[-1]["content"] for s in prep(tmp_path, tokenizer, [{"path": str(db), "query": query}]).train] == ["blue dog", "two"]
    for bad in (f"ATTACH DATABASE '{outside}' AS o", f"VACUUM INTO '{outside}'", "SELECT load_extension('x') AS prompt",
                "DETACH DATABASE main"):
        with pytest.raises(UserError, match=r"odd\?name#1\.db: query failed \((not authorized|authorization denied).*: ATTACH, DETACH and load_extension are refused.*check the query"):
            prep(tmp_path, tokenizer, [{"path": str(db), "query": bad}])
    with pytest.raises(UserError, match="readonly|read-only"):  # opened read-only: a query cannot change the user's database
        prep(tmp_path, tokenizer, [{"path": str(db), "query": "INSERT INTO faq VALUES ('x', 'y') RETURNING question AS prompt"}])
    assert not outside.exists() and hashlib.sha256(db.read_bytes()).hexdigest() == before


# ---- datasets registered by name --------------------------------------------------------------------------


def installed_package(site, name, dataset):
    """What `pip install` of a package declaring a `tuneforge.datasets` entry point leaves on sys.path."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (site / f"{name}.py").write_text(
        "def rows(options):\n"
        "    for i in range(options.get('n', 6)):\n"
        "        yield {'prompt': f'ticket {i}', 'completion': f'reply {i}'}\n")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[tuneforge.datasets]\n{dataset} = {name}:rows\n")


def test_dataset_registered_by_an_installed_package_needs_no_allow_code(tmp_path, tokenizer, monkeypatch):
    monkeypatch.delenv("TUNEFORGE_ALLOW_CODE", raising=False)
    installed_package(tmp_path / "site", "h4_tickets_pkg", "h4-tickets")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    data = prep(tmp_path, tokenizer, [{"custom": "h4-tickets", "options": {"n": 5}}])
    assert [s.messages[-1]["content"] for s in data.train] == [f"reply {i}" for i in range(5)]
    with pytest.raises(UserError, match="'h4-ticket' is not registered.*h4-tickets.*tuneforge.datasets"):
        prep(tmp_path, tokenizer, [{"custom": "h4-ticket"}])
    with pytest.raises(ValidationError, match="allow_code"):  # naming code directly still needs the opt-in
        DataConfig.model_validate({"train": [{"custom": "h4_tickets_pkg:rows"}]})


# ---- cleaned / train / val files ----------------------------------------------------------------------


def test_export_writes_cleaned_train_and_val_as_the_report_counts(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    rows = [chat(f"question {i}", f"answer {i}") for i in range(20)]
    rows += [rows[3], chat("line\u2028sep", "kept"), {"bad": 1}, {"prompt": "red", "chosen": "blue", "rejected": "green"}]
    tiny.write_jsonl(src / "t.jsonl", rows)
    out = tmp_path / "export"
    lines = []
    kw = {"eval_split": 0.2, "on_bad_row": "skip", "export_dir": str(out), "_log": lines.append}
    data = prep(tmp_path, tokenizer, [{"path": str(src / "t.jsonl")}], **kw)
    r = data.report
    cleaned, train, val = (jsonl_rows(out / f"{n}.jsonl") for n in ("cleaned", "train", "val"))
    assert len(cleaned) == r["rows_after_clean"] == 22 and r["dropped"] == {"exact duplicate": 1, "cannot detect the format from keys ['bad']": 1}
    assert len(train) == r["train_samples"] + len(data.pairs) and len(val) == r["eval_samples"] + len(data.eval_pairs)
    assert len(train) + len(val) == 22 and len(val) == 4 and data.export_dir == out
    assert [t["messages"] for t in train if "messages" in t] == [s.messages for s in data.train]
    assert chat("line\u2028sep", "kept") in cleaned and {"prompt": [{"role": "user", "content": "red"}], "chosen": [
        {"role": "assistant", "content": "blue"}], "rejected": [{"role": "assistant", "content": "green"}]} in train + val
    assert json.loads((out / "export.json").read_text())["rows"] == {"cleaned": 22, "train": len(train), "val": len(val)}
    assert any(line.startswith(f"data written: {out}/cleaned.jsonl (22 rows)") for line in lines)

    # The written files are tuneforge data: preparing them again gives the same training samples.
    again = prep(tmp_path / "again", tokenizer, [{"path": str(out / "train.jsonl")}], clean={"dedup": False})
    assert [s.input_ids for s in again.train] == [s.input_ids for s in data.train]

    # A cache hit leaves the files as they are; a cache made without export_dir is prepared again to write them.
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    assert prep(tmp_path, tokenizer, [{"path": str(src / "t.jsonl")}], **kw).cache_hit
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp
    second = tmp_path / "export2"
    assert not prep(tmp_path, tokenizer, [{"path": str(src / "t.jsonl")}], **{**kw, "export_dir": str(second)}).cache_hit
    assert (second / "val.jsonl").read_bytes() == (out / "val.jsonl").read_bytes()


def test_export_never_overwrites_the_users_files(tmp_path, tokenizer, monkeypatch):
    src = tmp_path / "data"
    src.mkdir()
    tiny.write_jsonl(src / "train.jsonl", tiny.reverse_rows(6))
    mine = (src / "train.jsonl").read_bytes()
    with pytest.raises(UserError, match="already holds train.jsonl, not written by tuneforge"):
        prep(tmp_path, tokenizer, [{"path": str(src / "train.jsonl")}], export_dir=str(src))
    with pytest.raises(UserError, match="inside the data folder"):  # it would be read back as data next time
        prep(tmp_path, tokenizer, [{"path": str(src)}], export_dir=str(src / "out"))
    assert (src / "train.jsonl").read_bytes() == mine and not (src / "out").exists()
    monkeypatch.setenv("RANK", "1")  # the other ranks of a distributed run read the cache: only the main rank writes files
    prep(tmp_path, tokenizer, [{"path": str(src / "train.jsonl")}], export_dir=str(tmp_path / "ranked"))
    assert not (tmp_path / "ranked").exists()


@pytest.mark.slow
def test_prepare_push_to_a_hub_dataset_and_without_network(tmp_path, llama_dir, fake_hub):
    train = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(12))
    cfg = write_config(tmp_path / "c.yaml", llama_dir, train, tmp_path / "run")
    proc = run_cli("prepare", cfg, "--push-to", "tester/reverse-data", env=fake_hub.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    pushed = fake_hub.files("tester/reverse-data", "dataset")
    local = tmp_path / "run" / "data"  # no data.export_dir: the run's own folder
    assert set(pushed) == {"cleaned.jsonl", "train.jsonl", "val.jsonl", "export.json", "README.md"}
    assert all(pushed[n] == (local / n).read_bytes() for n in ("cleaned.jsonl", "train.jsonl", "val.jsonl"))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert pushed["train.jsonl"].count(b"\n") == report["train_samples"] and pushed["val.jsonl"].count(b"\n") == report["eval_samples"]
    card = pushed["README.md"].decode()
    assert "path: train.jsonl" in card and "split: validation" in card and f"train.jsonl: {report['train_samples']} rows" in card

    offline = run_cli("prepare", cfg, "--push-to", "tester/reverse-data", env={**fake_hub.env(), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_user_error(offline, "--push-to tester/reverse-data", "cannot reach the Hugging Face Hub", "files stay in")
    assert_user_error(run_cli("prepare", cfg, "--push-to", "tester/reverse-data"), "HF_HUB_OFFLINE")  # said before any work


# ---- progress ------------------------------------------------------------------------------------------


def test_long_phases_print_progress_when_piped(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "PROGRESS_MIN_ITEMS", 10)  # these phases count as long from 10 items
    lines = []
    rows = tiny.reverse_rows(30)
    prep(tmp_path, tokenizer, [{"path": str(tiny.write_jsonl(tmp_path / "t.jsonl", rows + rows[:2]))}], packing="bins",
         _log=lines.append)
    assert lines[0] == "clean: dedup: started (32 to do)" and lines[1].startswith("clean: dedup: done, 32/32 in ")
    assert "tokenize: started (30 to do)" in lines and any(ln.startswith("tokenize: done, 30/30 in ") for ln in lines)
    assert "pack: started (30 to do)" in lines
