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
from ..progress import track
from .corpus import Unit
from .miner import batches, encode_units

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
    for p in prefixes:  # a prefix's words in text order (each once): ties keep their first appearance
        words.update(list(dict.fromkeys(w.lower() for w in _WORD.findall(decode(p)) if w.lower() not in STOP_WORDS)))
    topic = [(w, round(c / n, 3)) for w, c in words.most_common(8) if c / n >= topic_share]
    return {"label": "shallow" if share1 >= threshold else "semantic", "last_share": round(share1, 4),
            "ngram": ngram, "pattern": pattern, "last_token": decode([tok]), "topic": topic}


def decode_many(tok, seqs: list) -> list[str]:
    """``[tok.decode(s) for s in seqs]`` in one call of the Rust tokenizer when it gives the same strings
    (checked on the first sequences), else one decode each."""
    seqs = [list(map(int, s)) for s in seqs]
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and seqs:
        out = backend.decode_batch(seqs, skip_special_tokens=False)
        if getattr(tok, "clean_up_tokenization_spaces", False):
            out = [tok.clean_up_tokenization(t) for t in out]
        if all(o == tok.decode(s) for o, s in zip(out[:8], seqs[:8])):
            return out
    return [tok.decode(s) for s in seqs]


def _mode(eq: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the count of the most common item and the first column holding it (Counter.most_common's
    tie rule: the item seen first). eq (R, k, k): item s equals item r; valid (R, k)."""
    count = (eq & valid[:, None, :]).sum(2)  # (R, k): how many valid items equal item r
    count = np.where(valid, count, 0)
    best = count.max(1)
    return best, (count == best[:, None]).argmax(1)


def layer_pattern_arrays(atlas, layer: int, n: int | None = None, threshold: float = 0.5,
                         topic_share: float = 0.3, max_n: int = 4) -> dict:
    """:func:`key_pattern` of every key of a layer at once, as arrays over keys (no loop over keys).

    With the (d, k) trigger matrix of the layer: ``share_1`` is the mode count of the last tokens over the
    row (pairwise equality, (d, k, k)), the n-gram length the largest m whose mode count of last-m tokens
    stays >= threshold, the topic words the content words of the prefixes' texts (every prefix of the layer
    decoded in one tokenizer call) counted per key with ``np.unique``. Returns ``n``, ``label`` (d,) str,
    ``last_share`` (d,) (rounded as key_pattern does), ``ngram`` (d,), ``pattern`` (d,) object,
    ``last_token`` (d,) object, ``topic`` (list of d lists).
    """
    tok = atlas.model.tokenizer
    tm = atlas.trigger_matrix(layer, "top")
    k = atlas.top_k if n is None else min(n, atlas.top_k)
    U, P = tm["unit"][:, :k], tm["position"][:, :k]
    d = U.shape[0]
    valid = U >= 0
    cnt = valid.sum(1)
    last = atlas.token_at(U, P)
    eq = last[:, :, None] == last[:, None, :]
    best1, first1 = _mode(eq, valid)
    share1 = np.where(cnt > 0, best1 / np.maximum(cnt, 1), 0.0)
    shallow = (cnt > 0) & (share1 >= threshold)
    ngram = np.zeros(d, np.int64)
    gram_row = np.zeros(d, np.int64)  # the column whose last-m tokens are the pattern
    alive = shallow.copy()
    eq_m = np.ones_like(eq)
    for m in range(1, max_n + 1):
        t = atlas.token_at(U, P - (m - 1))
        eq_m = eq_m & (t[:, :, None] == t[:, None, :])
        long = valid & (P + 1 >= m)
        any_long = long.any(1)
        best, first = _mode(eq_m, long)
        alive &= any_long & (best / np.maximum(cnt, 1) >= threshold)
        ngram[alive], gram_row[alive] = m, first[alive]
    # texts: the last token of every key, its n-gram, and every prefix (for the topic words)
    keys = np.arange(d)
    last_tok = last[keys, first1]
    uniq, inv = np.unique(np.where(cnt > 0, last_tok, 0), return_inverse=True)
    last_text = np.array(decode_many(tok, [[t] for t in uniq]), dtype=object)[inv.reshape(-1)]
    pattern = np.full(d, None, dtype=object)
    sh = np.nonzero(ngram > 0)[0]
    if sh.size:
        gu, gp, gm = U[sh, gram_row[sh]], P[sh, gram_row[sh]], ngram[sh]
        grams = [atlas.units[int(u)][0][int(p) - int(m) + 1: int(p) + 1] for u, p, m in zip(gu, gp, gm)]
        pattern[sh] = decode_many(tok, grams)
    rows, cols = np.nonzero(valid)  # every trigger entry, key by key, rank by rank
    code = U[rows, cols] * (1 << 20) + P[rows, cols]
    uniq_pre, pre_of = np.unique(code, return_inverse=True)  # a prefix cited by many keys is decoded once
    pre_of = pre_of.reshape(-1)
    texts = decode_many(tok, [atlas.units[int(c >> 20)][0][: int(c & ((1 << 20) - 1)) + 1] for c in uniq_pre])
    vocab: dict[str, int] = {}
    stop: list[bool] = []
    flat: list[int] = []
    lens = np.zeros(len(texts), np.int64)
    for j, t in enumerate(texts):  # a loop over distinct prefixes: their content words, once each, in order
        ws = [vocab.setdefault(w, len(vocab)) for w in dict.fromkeys(x.lower() for x in _WORD.findall(t))]
        if len(vocab) > len(stop):
            stop += [w in STOP_WORDS for w in list(vocab)[len(stop):]]
        flat += ws
        lens[j] = len(ws)
    topic: list[list] = [[] for _ in range(d)]
    if flat:
        flat_w, stop_w = np.asarray(flat, np.int64), np.asarray(stop, bool)
        starts = np.cumsum(lens) - lens
        # the words of every entry: its prefix's word range, entries in (key, rank) order
        n_e = lens[pre_of]
        total = int(n_e.sum())
        first_of_entry = np.cumsum(n_e) - n_e
        within = np.arange(total) - np.repeat(first_of_entry, n_e)
        wid = flat_w[np.repeat(starts[pre_of], n_e) + within]
        occ_key = np.repeat(rows, n_e)
        occ = np.arange(total)  # insertion order of Counter.update: ranks in order, words in text order
        keep = ~stop_w[wid]
        occ_key, occ, wid = occ_key[keep], occ[keep], wid[keep]
        V = len(vocab)
        pair = occ_key * V + wid
        upair, first_idx, counts = np.unique(pair, return_index=True, return_counts=True)
        pk, pw, pfirst = upair // V, upair % V, occ[first_idx]
        order = np.lexsort((pfirst, -counts, pk))  # per key: count desc, then first appearance
        pk, pw, counts = pk[order], pw[order], counts[order]
        rank = np.arange(pk.size) - np.searchsorted(pk, pk)  # position within the key's list
        share = counts / np.maximum(cnt[pk], 1)
        sel = np.nonzero((rank < 8) & (share >= topic_share))[0]
        words = list(vocab)
        for i, w, c in zip(pk[sel].tolist(), pw[sel].tolist(), (counts[sel] / cnt[pk[sel]]).tolist()):
            topic[i].append((words[w], round(c, 3)))
    label = np.where(cnt == 0, "none", np.where(shallow, "shallow", "semantic"))
    su, si = np.unique(share1, return_inverse=True)  # Python's round (as key_pattern), once per distinct share
    rounded = np.array([round(float(x), 4) for x in su])[si.reshape(-1)]
    return {"n": cnt, "label": label, "last_share": rounded, "ngram": ngram, "pattern": pattern,
            "last_token": np.where(cnt > 0, last_text, None), "topic": topic}


def _pattern_row(arr: dict, i: int) -> dict:
    """One key's :func:`key_pattern` dict from :func:`layer_pattern_arrays`."""
    if arr["label"][i] == "none":
        return {"index": i, "label": "none", "last_share": 0.0, "ngram": 0, "pattern": None, "topic": []}
    return {"index": i, "label": str(arr["label"][i]), "last_share": float(arr["last_share"][i]),
            "ngram": int(arr["ngram"][i]), "pattern": arr["pattern"][i], "last_token": arr["last_token"][i],
            "topic": arr["topic"][i]}


def layer_patterns(atlas, layer: int, n: int | None = None, threshold: float = 0.5,
                   topic_share: float = 0.3) -> list[dict]:
    """:func:`key_pattern` of every key of a layer, from its ``n`` best top triggers (all by default)."""
    arr = layer_pattern_arrays(atlas, layer, n, threshold, topic_share)
    return [_pattern_row(arr, i) for i in range(len(arr["label"]))]


def pattern_summary(atlas, n: int | None = None, threshold: float = 0.5, topic_share: float = 0.3,
                    examples: int = 3, progress: bool = False) -> dict:
    """Share of shallow and semantic keys per layer (section 3), with example keys."""
    layers = []
    for l in track(range(atlas.n_layers), desc="patterns", unit="layer", enabled=progress):
        arr = layer_pattern_arrays(atlas, l, n, threshold, topic_share)
        labels, share = arr["label"], arr["last_share"].astype(np.float64)
        with_topic = np.array([bool(t) for t in arr["topic"]])
        sem = labels == "semantic"
        by_share = np.argsort(-share, kind="stable")[:examples]
        layers.append({
            "layer": l, "shallow": float((labels == "shallow").mean()), "semantic": float(sem.mean()),
            "semantic_with_topic": float((sem & with_topic).mean()),
            "mean_last_share": float(np.mean(share)),
            "examples_shallow": [_pattern_row(arr, int(i)) for i in by_share if labels[i] == "shallow"],
            "examples_semantic": [_pattern_row(arr, int(i)) for i in np.nonzero(sem & with_topic)[0][:examples]],
        })
    return {"threshold": threshold, "topic_share": topic_share, "n_triggers": n or atlas.top_k, "layers": layers}


def removal_items(atlas, keys_per_layer: int = 64, triggers_per_key: int = 1, seed: int = 0) -> list:
    """The sampled ``(layer, key, unit, position)`` of :func:`removal_effects`: per layer a seeded sample of
    keys, each key's best ``triggers_per_key`` top prefixes of at least 2 tokens."""
    rng = np.random.default_rng(seed)
    items = []
    for l in range(atlas.n_layers):
        tm = atlas.trigger_matrix(l, "top")
        keys = rng.choice(atlas.d_ffn, size=min(keys_per_layer, atlas.d_ffn), replace=False)
        for i in keys:
            for r in range(min(triggers_per_key, atlas.top_k)):
                u = tm["unit"][i, r]
                if u >= 0 and tm["position"][i, r] >= 1:
                    items.append((l, int(i), int(u), int(tm["position"][i, r])))
    return items


def removal_summary(atlas, items: list, c: np.ndarray, keys_per_layer: int, triggers_per_key: int) -> dict:
    """The per-layer summary of :func:`removal_effects` from c (n_items, 3): m(x), m(x without its last
    token), m(x without its first token)."""
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


@torch.no_grad()
def removal_effects(atlas, keys_per_layer: int = 64, triggers_per_key: int = 1, seed: int = 0,
                    batch_tokens: int = 2048, progress: bool = False) -> dict:
    """Coefficient change when a top prefix loses its last token or its first token, per layer.

    For sampled keys i and their top prefixes x = (x_1..x_t), t >= 2:
        change_last  = (m_i(x_1..x_{t-1}) - m_i(x)) / |m_i(x)|
        change_first = (m_i(x_2..x_t)     - m_i(x)) / |m_i(x)|
    The paper finds the last token matters most in lower layers and less higher up. Means are reported
    with medians: a key whose top coefficient is near 0 makes the relative change of its prefix explode.

    A causal model's coefficients at position p depend on tokens ``<= p`` only, so every prefix of a unit u
    is read off one pass over ``u[:P+1]`` (P the last position any sampled prefix of u needs), and every
    prefix without its first token off one pass over ``u[1:P+1]``: two sequences per distinct unit, sorted by
    length and packed into ``batch_tokens``-token batches, whatever the number of keys citing it. Equal to
    one pass per variant up to float rounding (the attention kernels see other lengths).
    """
    model = atlas.model
    items = removal_items(atlas, keys_per_layer, triggers_per_key, seed)
    need: dict[int, int] = {}
    deepest: dict[int, int] = {}
    for l, _, u, p in items:
        need[u] = max(need.get(u, 0), p)
        deepest[u] = max(deepest.get(u, 0), l)
    order = sorted(need)
    row_of = {u: j for j, u in enumerate(order)}
    seqs = [Unit(2 * j + v, 0, atlas.units[u][0][v: need[u] + 1], -1, "") for j, u in enumerate(order)
            for v in (0, 1)]  # unit id 2j: u[:P+1]; 2j + 1: u[1:P+1]
    # by deepest layer, then length: a batch stops after the deepest layer its sequences need, with little padding
    seqs.sort(key=lambda x: (deepest[order[x.unit // 2]], len(x.tokens), x.unit))
    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    it_l = np.array([it[0] for it in items], np.int64)
    it_i = np.array([it[1] for it in items], np.int64)
    it_j = np.array([row_of[it[2]] for it in items], np.int64)
    it_p = np.array([it[3] for it in items], np.int64)
    c = np.zeros((len(items), 3), np.float32)
    item_layers = sorted(set(it_l.tolist()))
    groups = []
    for l in sorted(set(deepest.values())):
        level = [x for x in seqs if deepest[order[x.unit // 2]] == l]
        groups += list(batches(iter(level), batch_tokens, max(len(x.tokens) for x in level)))
    for group in track(groups, desc="removal", unit="batch", enabled=progress):
        ids, mask = encode_units(group, pad, model.device)
        top = deepest[order[group[-1].unit // 2]]
        layers = [l for l in item_layers if l <= top]
        coef = capture_coefficients(model, ids, mask, layers)
        for b, x in enumerate(group):
            j, v = divmod(x.unit, 2)
            for l in layers:
                sel = np.nonzero((it_j == j) & (it_l == l))[0]
                if not sel.size:
                    continue
                m = coef[l][b].float()  # (T, d_ffn)
                p, i = torch.as_tensor(it_p[sel]), torch.as_tensor(it_i[sel])
                if v == 0:  # m(x) at p, m(x without its last token) at p - 1
                    c[sel, 0] = m[p, i].cpu().numpy()
                    c[sel, 1] = m[p - 1, i].cpu().numpy()
                else:  # x without its first token ends at p - 1 of u[1:]
                    c[sel, 2] = m[p - 1, i].cpu().numpy()
    return removal_summary(atlas, items, c, keys_per_layer, triggers_per_key)
