"""Write the demo dataset: turn a sentence about a person into a fixed-schema JSON record.

A 135M model does not produce this exact schema unprompted (key names, types, order), so held-out
exact-match accuracy shows plainly whether fine-tuning worked. Deterministic: same files every run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Ana", "Ben", "Chloe", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Liam", "Maya", "Nils",
         "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe", "Kofi", "Lena", "Marco"]
LAST = ["Silva", "Novak", "Moreau", "Ivanova", "Kaya", "Haddad", "Berg", "Lopez", "Costa", "Weber", "Tanaka", "Byrne",
        "Patel", "Larsen", "Nasser", "Rao", "Murphy", "Rossi", "Holm", "Singh", "Khan", "Petrova", "Chen", "Mendes"]
CITIES = ["Lisbon", "Prague", "Lyon", "Kazan", "Izmir", "Beirut", "Oslo", "Seville", "Porto", "Leipzig", "Osaka", "Cork",
          "Pune", "Aarhus", "Cairo", "Mysore", "Galway", "Turin", "Malmo", "Delhi", "Lahore", "Sofia", "Xian", "Recife"]
JOBS = ["nurse", "baker", "pilot", "teacher", "welder", "chemist", "farmer", "architect", "librarian", "plumber",
        "dentist", "journalist", "carpenter", "lawyer", "painter", "engineer", "cashier", "chef"]
TEMPLATES = [
    "{name} is {age}, lives in {city} and works as a {job}.",
    "{name}, a {age}-year-old {job}, lives in {city}.",
    "Meet {name}: {age} years old, {job}, based in {city}.",
    "In {city} there is a {job} called {name} who is {age}.",
    "{name} ({age}) works as a {job} in {city}.",
    "A {job} named {name}, aged {age}, calls {city} home.",
]
INSTRUCTION = "Turn this into a JSON record: "


def make_row(rng: random.Random, name: str, template: str) -> dict:
    person = {"name": name, "age": rng.randint(19, 78), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    sentence = template.format(**person)
    record = json.dumps(person)  # fixed key order and spacing: the format the model must learn
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence}, {"role": "assistant", "content": record}]}


def build(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    # Held-out people never appear in training: eval measures the format, not memorised names.
    eval_names, train_names = names[:n_eval], names[n_eval:]
    train = [make_row(rng, train_names[i % len(train_names)], TEMPLATES[i % len(TEMPLATES)]) for i in range(n_train)]
    evals = [make_row(rng, eval_names[i], rng.choice(TEMPLATES)) for i in range(n_eval)]
    return train, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="examples/demo/data")
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    train, evals = build(args.train, args.eval, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} train and {len(evals)} held-out rows to {out}")


if __name__ == "__main__":
    main()
