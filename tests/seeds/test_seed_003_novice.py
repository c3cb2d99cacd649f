"""Seed 003 (the Novice's LLM Training Guide): the reader's own scraped HTML pages, a CSV from an open-data portal
and an SQL dump -> cleaned (duplicates, "As an AI language model" boilerplate, clustering for diversity) -> split
-> the cleaned jsonl and `train.jsonl` / `val.jsonl` written where the reader keeps them -> a short fine-tune.

The guide does each step with a script of its own and keeps every file; here one config does them all, and the
files it writes must hold exactly the rows the data report counts and the run trained on.
"""

import json

import pytest

from helpers import run_cli, write_config

TOPICS = {  # three kinds of question, so clustering has topics to balance
    "weather": ["Will it rain in {} tomorrow?", "Bring an umbrella to {}: showers are likely."],
    "trains": ["When does the next train to {} leave?", "The next train to {} leaves at nine."],
    "food": ["What is a typical dish in {}?", "People in {} love a slow-cooked stew."],
}
CITIES = ["Oslo", "Lima", "Pune", "Kiev", "Rome", "Cork"]
PAGE = ("<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> | <a href='/about'>About us</a></nav>"
        "<article><h1>{title}</h1><p>{body}</p></article><footer>Copyright 2026 Example Corp. Cookie settings.</footer>"
        "</body></html>")


def write_sources(folder):
    folder.mkdir()
    html = folder / "pages"
    html.mkdir()
    for name, animal in (("otters", "otters hunt fish in cold rivers"), ("owls", "owls hunt mice at night")):
        body = " ".join(f"Sentence {i} of the field notes says that {animal} every season." for i in range(6))
        (html / f"{name}.html").write_text(PAGE.format(title=name.title(), body=body))
    rows = [(q.format(c), a.format(c)) for q, a in TOPICS.values() for c in CITIES]
    rows += [rows[0], ("Tell me about Oslo.", "As an AI language model, I cannot browse the web.")]  # a duplicate, a refusal
    csv = folder / "questions.csv"
    csv.write_text("input,output\n" + "".join(f'"{q}","{a}"\n' for q, a in rows))
    dump = folder / "faq.sql"
    dump.write_text("BEGIN TRANSACTION;\nCREATE TABLE faq (question TEXT, answer TEXT);\n"
                    "INSERT INTO faq VALUES ('How do I reset my password?', 'Use the link on the sign-in page.');\n"
                    "INSERT INTO faq VALUES ('Where is my order?', 'Your order page shows where it is.');\nCOMMIT;\n")
    return html, csv, dump, len(rows)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.mark.slow
def test_novice_sources_cleaned_split_written_and_trained(tmp_path, llama_dir):
    html, csv, dump, csv_rows = write_sources(tmp_path / "raw")
    kept = tmp_path / "dataset"  # where the guide's reader keeps dataset.jsonl, train.jsonl and val.jsonl
    cfg = write_config(tmp_path / "novice.yaml", llama_dir, csv, tmp_path / "run", data={
        "train": [{"path": str(html)}, {"path": str(csv)},
                  {"path": str(dump), "query": "SELECT question AS input, answer AS output FROM faq"}],
        "clean": {"dedup": True, "drop_refusals": True, "clusters": 3, "max_per_cluster": 5},
        "eval_split": 0.2, "export_dir": str(kept)},
        train={"max_steps": 2, "micro_batch_size": 2})
    proc = run_cli("train", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data written: {kept}/cleaned.jsonl" in " ".join(proc.stderr.split())

    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    cleaned, train, val = (read_jsonl(kept / f"{name}.jsonl") for name in ("cleaned", "train", "val"))
    assert report["rows_read"] == 2 + csv_rows + 2
    assert report["dropped"]["exact duplicate"] == 1 and report["dropped"]["refusal / boilerplate phrase"] == 1
    capped = report["dropped"]["over cluster cap"]
    assert capped > 0 and len(cleaned) == report["rows_after_clean"] == report["rows_read"] - 2 - capped
    assert (len(train), len(val)) == (report["train_samples"], report["eval_samples"]) and len(train) + len(val) == len(cleaned)
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, cleaned))  # the split of the cleaned rows, nothing else

    texts = [json.dumps(r) for r in cleaned]
    assert not any("As an AI language model" in t for t in texts)
    pages = [r["text"] for r in cleaned if "text" in r]  # HTML pages: main text, no menu or footer
    assert pages and all("hunt" in p and "Cookie settings" not in p and "About us" not in p for p in pages)
    chats = [r["messages"] for r in cleaned if "messages" in r]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in chats)
    manifest = json.loads((kept / "export.json").read_text())
    assert manifest["rows"] == {"cleaned": len(cleaned), "train": len(train), "val": len(val)}
    assert manifest["fingerprint"] == report["fingerprint"]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
