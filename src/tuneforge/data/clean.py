"""Cleaning and selection on converted items. Every step returns what it kept and counts what it
removed, by reason: nothing is dropped without a line in the report."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import Any

from tuneforge.config.schema import CleanConfig

def item_text(item: Any) -> str:
    """All text of an item (conversation, corpus text, tool conversation, preference pair)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "chosen" in item:
            return item_text(item["prompt"]) + "\n" + item_text(item["chosen"])
        return item_text(item["messages"])
    # Tool calls count as text: two conversations that differ only in call arguments are not duplicates.
    return "\n".join(str(m.get("content") or "") + (json.dumps(m["tool_calls"], sort_keys=True) if m.get("tool_calls") else "") for m in item)


def answer_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return answer_text(item["chosen"] if "chosen" in item else item["messages"])
    return "\n".join(str(m.get("content") or "") for m in item if m["role"] == "assistant")


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def clean(items: list, cfg: CleanConfig, seed: int, removed: Counter, progress=None) -> list:
    """`progress(name, total)` -> a context giving a counter with .advance() (prepare.progress); none = silent."""
    steps = [
        ("dedup", cfg.dedup, lambda xs, tick: exact_dedup(xs, removed, tick)),
        ("near-dedup", cfg.near_dedup, lambda xs, tick: near_dedup(xs, cfg.near_dedup, removed, tick=tick)),
        ("refusals", cfg.drop_refusals, lambda xs, tick: drop_refusals(xs, cfg.refusal_phrases, removed, tick)),
        ("languages", cfg.languages, lambda xs, tick: keep_languages(xs, cfg.languages, removed, tick)),
        ("clusters", cfg.clusters and cfg.max_per_cluster, lambda xs, tick: cap_clusters(xs, cfg.clusters, cfg.max_per_cluster, seed, removed)),
    ]
    for name, enabled, step in steps:
        if not enabled:
            continue
        if progress is None:
            items = step(items, _no_tick)
            continue
        with progress(name, len(items)) as bar:
            items = step(items, bar.advance)
    return items


def _no_tick(n: int = 1) -> None:
    pass


def exact_dedup(items: list, removed: Counter, tick=_no_tick) -> list:
    seen, out = set(), []
    for it in items:
        tick()
        key = hashlib.sha1(normalise(item_text(it)).encode()).digest()
        if key in seen:
            removed["exact duplicate"] += 1
            continue
        seen.add(key)
        out.append(it)
    return out


def near_dedup(items: list, threshold: float, removed: Counter, num_perm: int = 64, tick=_no_tick) -> list:
    """MinHash LSH over word 3-gram shingles: keep the first of each group of near-duplicates."""
    from datasketch import MinHash, MinHashLSH

    lsh, out = MinHashLSH(threshold=threshold, num_perm=num_perm), []
    for i, it in enumerate(items):
        tick()
        words = normalise(item_text(it)).split()
        shingles = {" ".join(words[k : k + 3]) for k in range(max(1, len(words) - 2))}
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch([s.encode() for s in shingles])
        if lsh.query(mh):
            removed["near duplicate"] += 1
            continue
        lsh.insert(str(i), mh)
        out.append(it)
    return out


def drop_refusals(items: list, phrases: list[str], removed: Counter, tick=_no_tick) -> list:
    lowered = [p.lower() for p in phrases]
    out = []
    for it in items:
        tick()
        answer = answer_text(it).lower()
        if any(p in answer for p in lowered):
            removed["refusal / boilerplate phrase"] += 1
            continue
        out.append(it)
    return out


def keep_languages(items: list, languages: list[str], removed: Counter, tick=_no_tick) -> list:
    import py3langid as langid

    out = []
    for it in items:
        tick()
        lang, _ = langid.classify(item_text(it))
        if lang not in languages:
            removed[f"language {lang}"] += 1
            continue
        out.append(it)
    return out


def cap_clusters(items: list, k: int, cap: int, seed: int, removed: Counter) -> list:
    """TF-IDF + k-means; keep at most `cap` samples per cluster so no topic dominates."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(items) <= k:
        return items
    vectors = TfidfVectorizer(max_features=20000).fit_transform([item_text(it) for it in items])
    labels = KMeans(n_clusters=k, random_state=seed, n_init=3).fit_predict(vectors)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    taken, keep = Counter(), set()
    for i in order:
        if taken[labels[i]] < cap:
            taken[labels[i]] += 1
            keep.add(i)
    removed["over cluster cap"] += len(items) - len(keep)
    return [it for i, it in enumerate(items) if i in keep]
