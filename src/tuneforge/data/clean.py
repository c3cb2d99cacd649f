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


def clean(items: list, cfg: CleanConfig, seed: int, removed: Counter) -> list:
    if cfg.dedup:
        items = exact_dedup(items, removed)
    if cfg.near_dedup:
        items = near_dedup(items, cfg.near_dedup, removed)
    if cfg.drop_refusals:
        items = drop_refusals(items, cfg.refusal_phrases, removed)
    if cfg.languages:
        items = keep_languages(items, cfg.languages, removed)
    if cfg.clusters and cfg.max_per_cluster:
        items = cap_clusters(items, cfg.clusters, cfg.max_per_cluster, seed, removed)
    return items


def exact_dedup(items: list, removed: Counter) -> list:
    seen, out = set(), []
    for it in items:
        key = hashlib.sha1(normalise(item_text(it)).encode()).digest()
        if key in seen:
            removed["exact duplicate"] += 1
            continue
        seen.add(key)
        out.append(it)
    return out


def near_dedup(items: list, threshold: float, removed: Counter, num_perm: int = 64) -> list:
    """MinHash LSH over word 3-gram shingles: keep the first of each group of near-duplicates."""
    from datasketch import MinHash, MinHashLSH

    lsh, out = MinHashLSH(threshold=threshold, num_perm=num_perm), []
    for i, it in enumerate(items):
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


def drop_refusals(items: list, phrases: list[str], removed: Counter) -> list:
    lowered = [p.lower() for p in phrases]
    out = []
    for it in items:
        answer = answer_text(it).lower()
        if any(p in answer for p in lowered):
            removed["refusal / boilerplate phrase"] += 1
            continue
        out.append(it)
    return out


def keep_languages(items: list, languages: list[str], removed: Counter) -> list:
    import py3langid as langid

    out = []
    for it in items:
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
