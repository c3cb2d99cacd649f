"""CLI-level: one `tuneforge prepare` over every local source kind and every cleaning filter at once;
the report accounts for each dataset and each removal."""

import json
import sqlite3
from pathlib import Path

import pytest
import yaml

import tiny
from helpers import run_cli

pytestmark = pytest.mark.slow


def build_sources(d):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir()
    tiny.write_jsonl(d / "chat.jsonl", tiny.reverse_rows(6, seed=1))
    (d / "faq.csv").write_text("question,answer\nred cat,blue dog\none two,three\n")
    (d / "pairs.tsv").write_text("input\toutput\ngreen mat\tred mat\n")
    pq.write_table(pa.table({"prompt": ["the cat"], "completion": ["sat on the mat"]}), d / "t.parquet")
    (d / "notes.txt").write_text("the dog sat\nthe cat ran\n")
    body = " ".join(f"Otters hunt fish in cold rivers, sentence {i}." for i in range(12))
    (d / "page.html").write_text(f"<html><body><nav>Home | About us</nav><article><p>{body}</p></article></body></html>")
    con = sqlite3.connect(d / "app.db")
    con.execute("CREATE TABLE faq (q TEXT, a TEXT)")
    con.execute("INSERT INTO faq VALUES ('hello world', 'the answer')")
    con.commit()
    con.close()
    (d / "dump.sql").write_text("CREATE TABLE posts (body TEXT); INSERT INTO posts VALUES ('red blue green one two three');")
    datasets.Dataset.from_list([{"instruction": "say one", "output": "one"}]).save_to_disk(d / "saved")
    dup = tiny.reverse_rows(1, seed=9)[0]
    refusal = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "As an AI language model, I cannot."}]}
    tiny.write_jsonl(d / "dirty.jsonl", [dup, dup, refusal, {"messages": [{"role": "user", "content": "no answer"}]}])


def test_prepare_every_source_and_filter_via_cli(tmp_path, llama_dir):
    d = tmp_path / "src"
    build_sources(d)
    train = [
        {"path": str(d / "chat.jsonl")}, {"path": str(d / "faq.csv"), "columns": {"question": "prompt", "answer": "completion"}},
        {"path": str(d / "pairs.tsv")}, {"path": str(d / "t.parquet")}, {"path": str(d / "notes.txt"), "text_unit": "line"},
        {"path": str(d / "page.html")}, {"path": str(d / "app.db"), "query": "SELECT q AS prompt, a AS completion FROM faq"},
        {"path": str(d / "dump.sql"), "query": "SELECT body AS text FROM posts"}, {"path": str(d / "saved")},
        {"custom": "custom_data:get_data", "options": {"n": 2}}, {"path": str(d / "dirty.jsonl")},
    ]
    cfg = {"model": {"path": str(llama_dir)},
           "data": {"train": train, "eval_size": 2, "cache_dir": str(tmp_path / "cache"), "on_bad_row": "skip", "max_length": 4096, "allow_code": True,
                    "clean": {"dedup": True, "drop_refusals": True}},
           "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    tests_dir = {"PYTHONPATH": str(Path(__file__).parent)}  # so custom_data imports in the CLI process
    proc = run_cli("prepare", tmp_path / "c.yaml", env=tests_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    used = [ds["used"] for ds in report["datasets"]]
    assert used == [6, 2, 1, 1, 2, 1, 1, 1, 1, 2, 3]  # dirty.jsonl: 4 rows, 1 without an answer
    assert report["dropped"] == {"no assistant turn with content": 1, "exact duplicate": 1, "refusal / boilerplate phrase": 1}
    assert report["train_samples"] + report["eval_samples"] == sum(used) - 2 and report["eval_samples"] == 2
    # Bin packing numbers follow the packing settings without re-preparing (packing is not in the cache key).
    binned = run_cli("prepare", tmp_path / "c.yaml", "--set", "data.packing=bins", env=tests_dir)
    assert binned.returncode == 0 and "cache hit" in binned.stdout and "packing bin_fill" in binned.stdout
    packing = json.loads((tmp_path / "run" / "data_report.json").read_text())["packing"]
    assert packing["mode"] == "bins" and packing["pack_length"] == 4096 and 1 <= packing["bins"] <= 3
    texts = ""
    for split in ("train", "eval"):
        show = run_cli("data", "inspect", tmp_path / "c.yaml", "--split", split, "--limit", "40", "--json", env=tests_dir)
        texts += " ".join(r["text"] for r in json.loads(show.stdout))
    assert "Otters hunt fish" in texts and "About us" not in texts and "the answer" in texts and "red blue green" in texts
