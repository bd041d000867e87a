"""Pattern analysis of trigger examples (Geva et al. 2021, section 3), with automatic labels.

The paper had annotators find patterns shared by at least 3 of a key's 25 top prefixes and sort them
into *shallow* (a shared last token or last n-gram) and *semantic* (a shared topic). Here:

    share_1 = max_w  |{prefixes whose last token is w}| / n        (n = number of top triggers)
    share_n = same for the last n tokens
    label   = "shallow" if share_1 >= threshold else "semantic"

and a semantic key is shown with its topic words: content words (no stop words) that occur in at least
``topic_share`` of its prefixes. The removal experiment (section 3) recomputes a key's
coefficient on its top prefixes without their last token and without their first token.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch

from ..models.engine import capture_coefficients
from .corpus import Unit
from .miner import encode_units

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours yourself yourselves also one two said
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+")


def is_stop_token(text: str) -> bool:
    """A stop word or a token with no letters (punctuation, numbers, markup)."""
    w = text.strip().lower()
    return not any(c.isalpha() for c in w) or w in STOP_WORDS


def key_pattern(prefixes: list[list[int]], decode, threshold: float = 0.5, topic_share: float = 0.3,
                max_n: int = 4) -> dict:
    """The label of one key from its top trigger prefixes (lists of token ids), see module docstring."""
    n = len(prefixes)
    if n == 0:
        return {"label": "none", "last_share": 0.0, "ngram": 0, "pattern": None, "topic": []}
    last = Counter(p[-1] for p in prefixes)
    tok, count = last.most_common(1)[0]
    share1 = count / n
    ngram, pattern = 0, None
    if share1 >= threshold:
        for m in range(1, max_n + 1):
            c = Counter(tuple(p[-m:]) for p in prefixes if len(p) >= m)
            if not c:
                break
            g, cnt = c.most_common(1)[0]
            if cnt / n < threshold:
                break
            ngram, pattern = m, decode(list(g))
    words = Counter()
    for p in prefixes:
        words.update({w.lower() for w in _WORD.findall(decode(p)) if w.lower() not in STOP_WORDS})
    topic = [(w, round(c / n, 3)) for w, c in words.most_common(8) if c / n >= topic_share]
    return {"label": "shallow" if share1 >= threshold else "semantic", "last_share": round(share1, 4),
            "ngram": ngram, "pattern": pattern, "last_token": decode([tok]), "topic": topic}


def layer_patterns(atlas, layer: int, n: int | None = None, threshold: float = 0.5,
                   topic_share: float = 0.3) -> list[dict]:
    """:func:`key_pattern` of every key of a layer, from its ``n`` best top triggers (all by default)."""
    tok = atlas.model.tokenizer
    tm = atlas.trigger_matrix(layer, "top")
    k = atlas.top_k if n is None else min(n, atlas.top_k)
    cache: dict = {}

    def decode(ids):
        key = tuple(ids)
        if key not in cache:
            cache[key] = tok.decode(list(ids))
        return cache[key]

    out = []
    for i in range(atlas.d_ffn):
        prefixes = [atlas.prefix(u, p) for u, p in zip(tm["unit"][i, :k], tm["position"][i, :k]) if u >= 0]
        out.append({"index": i, **key_pattern(prefixes, decode, threshold, topic_share)})
    return out


def pattern_summary(atlas, n: int | None = None, threshold: float = 0.5, topic_share: float = 0.3,
                    examples: int = 3) -> dict:
    """Share of shallow and semantic keys per layer (section 3), with example keys."""
    layers = []
    for l in range(atlas.n_layers):
        pats = layer_patterns(atlas, l, n, threshold, topic_share)
        labels = np.array([p["label"] for p in pats])
        with_topic = np.array([bool(p["topic"]) for p in pats])
        sem = labels == "semantic"
        layers.append({
            "layer": l, "shallow": float((labels == "shallow").mean()), "semantic": float(sem.mean()),
            "semantic_with_topic": float((sem & with_topic).mean()),
            "mean_last_share": float(np.mean([p["last_share"] for p in pats])),
            "examples_shallow": [p for p in sorted(pats, key=lambda p: -p["last_share"])[:examples]
                                 if p["label"] == "shallow"],
            "examples_semantic": [p for p in pats if p["label"] == "semantic" and p["topic"]][:examples],
        })
    return {"threshold": threshold, "topic_share": topic_share, "n_triggers": n or atlas.top_k, "layers": layers}


@torch.no_grad()
def removal_effects(atlas, keys_per_layer: int = 64, triggers_per_key: int = 1, seed: int = 0,
                    batch_size: int = 64) -> dict:
    """Coefficient change when a top prefix loses its last token or its first token, per layer.

    For sampled keys i and their top prefixes x = (x_1..x_t), t >= 2:
        change_last  = (m_i(x_1..x_{t-1}) - m_i(x)) / |m_i(x)|
        change_first = (m_i(x_2..x_t)     - m_i(x)) / |m_i(x)|
    The paper finds the last token matters most in lower layers and less higher up. Means are reported
    with medians: a key whose top coefficient is near 0 makes the relative change of its prefix explode.
    """
    model = atlas.model
    rng = np.random.default_rng(seed)
    items = []  # (layer, key, tokens)
    for l in range(atlas.n_layers):
        tm = atlas.trigger_matrix(l, "top")
        keys = rng.choice(atlas.d_ffn, size=min(keys_per_layer, atlas.d_ffn), replace=False)
        for i in keys:
            for r in range(min(triggers_per_key, atlas.top_k)):
                u = tm["unit"][i, r]
                if u >= 0 and tm["position"][i, r] >= 1:
                    items.append((l, int(i), atlas.prefix(u, tm["position"][i, r])))
    variants = [(it, v) for it in items for v in (it[2], it[2][:-1], it[2][1:])]
    coefs = np.zeros(len(variants), np.float32)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    for s in range(0, len(variants), batch_size):
        chunk = variants[s: s + batch_size]
        ids, mask = encode_units([Unit(j, 0, v, -1, "") for j, (_, v) in enumerate(chunk)], pad, model.device)
        coef = capture_coefficients(model, ids, mask, sorted({l for (l, _, _), _ in chunk}))
        last = mask.sum(1) - 1
        for b, ((l, i, _), _) in enumerate(chunk):
            coefs[s + b] = coef[l][b, last[b], i].float().item()
    c = coefs.reshape(-1, 3)
    layers = []
    lay = np.array([it[0] for it in items])
    for l in range(atlas.n_layers):
        sel = lay == l
        base = np.abs(c[sel, 0]).clip(min=1e-6)
        dl = (c[sel, 1] - c[sel, 0]) / base
        df = (c[sel, 2] - c[sel, 0]) / base
        layers.append({"layer": l, "n": int(sel.sum()),
                       "change_remove_last": float(dl.mean()) if sel.any() else None,
                       "change_remove_first": float(df.mean()) if sel.any() else None,
                       "median_change_remove_last": float(np.median(dl)) if sel.any() else None,
                       "median_change_remove_first": float(np.median(df)) if sel.any() else None})
    return {"keys_per_layer": keys_per_layer, "triggers_per_key": triggers_per_key, "layers": layers}
