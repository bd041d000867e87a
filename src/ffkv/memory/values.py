"""Values in the vocabulary space (Geva et al. 2021, section 4) and queries over them.

Each value v_i^l (a column of W_out) is read as a distribution over the vocabulary,

    p_i^l = softmax(E v_i^l)          or, with the final norm,  softmax(E ln_f(v_i^l))

(``norm`` is an explicit option: the paper projects raw values). Projections are computed ``chunk`` values
at a time, so a ``d_ffn x vocab`` matrix never exists for more than one chunk of one layer. ``E`` is the
family's real head (:meth:`MemoryModel.unembed`: logit scaling and soft-capping included).

Post-norm families (Gemma-2/3, OLMo-2) write ``N(sum_i m_i v_i + b)`` into the residual, so a value's
effect on the residual is ``g ⊙ v_i`` (``g`` the post-FFN norm's gain, up to a positive per-token scale):
every projection here reads :meth:`MemoryModel.write_values`, which is ``W_out`` itself elsewhere, and
``value_norm`` is the norm of that vector.

Mixture-of-experts models (:class:`~ffkv.models.moe.MoEModel`): memory i of expert e at layer l
(``L3.E2.17``) has the value ``v_i^e``, column i of expert e's ``W_out`` (``model.values(l, e)``); every function
here takes ``expert=`` and reads that expert's values exactly as it reads a dense layer's. ``expert=None`` is
the layer's dense FFN (Qwen2-MoE's shared expert, a dense layer of a mixed model), as on a dense model.
The routing weight ``w_e`` scales all of an expert's memories alike, so it does not change a projection.

Agreement (section 4): how often the top token of p_i^l equals the next token of key i's top
trigger prefix, per layer, against a random baseline that pairs each value with another key's trigger
(a random permutation of keys within the layer).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FfkvError
from ..models.memory_id import MemoryId
from ..models.moe import MoEModel
from ..models.spec import get_path
from ..progress import track


def write_values(model, layer: int, expert: int | None = None) -> torch.Tensor:
    """The values of one FFN as they write into the residual, (d_model, F): column i is ``g ⊙ v_i`` (``s v_i``).

    ``expert=None``: :meth:`MemoryModel.write_values` (the dense FFN, or the shared expert of an MoE layer).
    An expert's values are scaled by the same post-FFN norm gain ``g`` and residual scale ``s`` as the
    block's output, which its experts write through; without either this is ``model.values(layer, expert)``.
    """
    if expert is None:
        return model.write_values(layer)
    v = model.values(layer, expert)
    gain = model.post_norm_gain(layer)
    v = v if gain is None else v * gain[:, None]
    return v if model.residual_scale == 1.0 else v * model.residual_scale


def ffns(model, layers=None) -> list[tuple[int, int | None]]:
    """The FFNs of the chosen layers as ``(layer, expert)``: ``expert=None`` for a dense FFN (or a shared
    expert), one pair per routed expert of an MoE layer. A dense model has ``(l, None)`` per layer."""
    layers = range(model.n_layers) if layers is None else layers
    if not isinstance(model, MoEModel):
        return [(l, None) for l in layers]
    out = []
    for l in layers:
        if model.is_moe_layer(l):
            out += [(l, e) for e in range(model.n_experts(l))]
            if model.has_shared_expert(l):
                out.append((l, None))
        else:
            out.append((l, None))
    return out


@torch.no_grad()
def value_logits(model, layer: int, indices=None, norm: bool = False, expert: int | None = None) -> torch.Tensor:
    """``E v_i`` (or ``E ln_f(v_i)``) for the chosen values of a layer (or of its expert ``expert``):
    (n, vocab) float32.

    ``v_i`` is the value as it writes into the residual (``g ⊙ v_i`` in post-norm families)."""
    V = write_values(model, layer, expert).T  # (F, d_model); a view of W_out where there is no post norm
    if indices is not None:
        V = V[torch.as_tensor(indices, device=V.device, dtype=torch.long)]
    return model.unembed(V, norm=norm).float()


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16 keeps 8 significant bits


def head_input(model, x: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """What :meth:`MemoryModel.unembed` feeds its unembedding: ``proj(final_norm(x))`` (the norm only with
    ``norm``), in the model's dtype; (..., d_model) -> (..., d_head). ``unembed(x) == scale_logits(E ·
    head_input(x))``; tests/test_values_fast.py checks that the two stay in step."""
    x = x.to(model.dtype)
    if norm and model.final_norm is not None:
        x = model.final_norm(x)
    proj = get_path(model.hf, model.spec.final_proj)
    return proj(x) if proj is not None else x


def _bf16_pays(device: torch.device) -> bool:
    """A bfloat16 product is several times faster than a float32 one here (oneDNN's bf16 kernels on CPU)."""
    if device.type != "cpu":
        return False  # cuBLAS may reduce bf16 products in reduced precision: the bound below would not hold
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and probe())


class HeadScreen:
    """The exact top token of the head's logits, ``argmax_t unembed(x)_t`` (or ``argmin``), for many rows,
    at a fraction of the float32 product's cost: screen-then-verify.

    For rows h = head_input(x) (n, d) and the unembedding E (V, d), bias b:

        z'  = bf16(E|b) · bf16(h|1)          one bfloat16 product, float32 accumulation (oneDNN)
        S   = the ``candidates`` tokens with the highest z' (lowest for argmin)
        z_S = E_S h + b_S                    float32, the candidates only
        |z_t - z'_t| <= (2u + u^2 + 3 gamma_d) (||h|| max_t ||E_t|| + max_t |b_t|) + 2u |z'_t|,   u = 2^-8

    (input rounding of both factors, float32 accumulation of the reference product, of the bf16 product and
    of z_S, rounding of z' to bfloat16; Cauchy-Schwarz bounds ``sum_k |E_tk h_k|``). A row is certified when
    its best candidate beats that bound for every token outside S, after the family's logit scaling and
    soft-cap (:meth:`MemoryModel.scale_logits`, monotone); every other row is recomputed with the float32
    head (:meth:`MemoryModel.unembed`). Ties go to the lowest token id, as ``argmax`` does. The result equals
    ``model.unembed(x, norm).argmax(-1)`` up to logits that tie within float32 rounding (the candidates' sums
    run in another order than the full product's). Off CPU, in other dtypes, with a head that is not one
    linear layer, or where bf16 products are not fast (``screen=None`` decides), it is that expression.
    """

    def __init__(self, model, candidates: int = 16, screen: bool | None = None, chunk: int = 1024):
        self.model, self.candidates, self.chunk = model, candidates, chunk
        head = model.unembedding
        W = getattr(head, "weight", None)
        fits = isinstance(head, torch.nn.Linear) and W is not None and W.dtype == torch.float32
        self.screen = fits and (_bf16_pays(W.device) if screen is None else screen)
        self.n_fallback = self.n_rows = 0
        if self.screen:
            self.W, b = W.detach(), head.bias
            self.b = None if b is None else b.detach()
            self.W_max = float(self.W.norm(dim=1).max())
            self.b_max = 0.0 if b is None else float(self.b.abs().max())
            Wb = self.W if b is None else torch.cat([self.W, self.b[:, None]], 1)
            self.Wb = Wb.to(torch.bfloat16)  # (V, d [+ 1]): a bias rides in the product as a last column

    @torch.no_grad()
    def top1(self, x: torch.Tensor, norm: bool = True, largest: bool = True) -> torch.Tensor:
        """x (..., d_model) -> (...,) long: ``argmax`` (``argmin`` with ``largest=False``) of ``unembed(x, norm)``."""
        model = self.model
        shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for s in range(0, x.shape[0], self.chunk):  # a (chunk, vocab) block of logits at a time
            xc = x[s: s + self.chunk]
            out[s: s + xc.shape[0]] = self._screened(xc, head_input(model, xc, norm), norm, largest) \
                if self.screen else self._full(xc, norm, largest)
        return out.reshape(shape)

    def _full(self, x, norm, largest):
        z = self.model.unembed(x, norm=norm)
        return z.argmax(-1) if largest else z.argmin(-1)

    def _screened(self, x, h, norm, largest):
        c = min(self.candidates, self.W.shape[0] - 1)
        n, d = h.shape
        sign = 1.0 if largest else -1.0
        h1 = h if self.b is None else torch.cat([h, torch.ones_like(h[:, :1])], 1)
        zb = torch.nn.functional.linear(h1.to(torch.bfloat16), self.Wb)  # (n, V) bfloat16
        vals, idx = zb.topk(c + 1, dim=-1, largest=largest)
        cand = idx[:, :c]
        zc = torch.bmm(self.W[cand], h[:, :, None]).squeeze(-1)  # (n, c) float32
        if self.b is not None:
            zc = zc + self.b[cand]
        u, gamma = BF16_UNIT_ROUNDOFF, (d + 1) * 2.0 ** -24 / (1 - (d + 1) * 2.0 ** -24)
        size = h.norm(dim=1) * self.W_max + self.b_max  # >= sum_k |E_tk h_k| + |b_t| for every t
        slack = (2 * u + u * u + 3 * gamma) * size * 1.01
        edge = sign * vals[:, c].float()  # every token outside S has sign * z' <= edge
        bound = edge + 2 * u * edge.abs() + slack  # ... and sign * z <= bound
        scale = self.model.scale_logits
        zs = sign * scale(zc)
        best = zs.max(1).values
        win = torch.where(zs == best[:, None], cand, torch.iinfo(torch.long).max).min(1).values
        low = (sign * zc).max(1).values - 2 * gamma * size  # the float32 head's best is at least this
        ok = (low > bound) & (sign * scale(sign * low) > sign * scale(sign * bound))  # also after the soft-cap
        self.n_rows += n
        bad = (~ok).nonzero().squeeze(1)
        if bad.numel():
            self.n_fallback += int(bad.numel())
            win[bad] = self._full(x[bad], norm, largest)
        return win


@torch.no_grad()
def project_values(model, layer: int, norm: bool = False, top_n: int = 10, chunk: int = 1024,
                   targets: np.ndarray | None = None, expert: int | None = None, extremes: bool = False) -> dict:
    """Top tokens and statistics of every value of one layer (or of its expert ``expert``), ``chunk``
    values at a time.

    Returns numpy arrays: ``top_ids``/``top_p`` (d_ffn, top_n), ``bottom_ids`` (d_ffn, top_n) (lowest
    logits: what the value promotes when its coefficient is negative), ``max_p`` (d_ffn,), ``lse`` (d_ffn,)
    logsumexp of the logits (so p of any token is ``exp(E_t . v - lse)``), ``value_norm`` (d_ffn,), and,
    if ``targets`` (d_ffn,) token ids are given, ``target_rank`` (0 = the value's top token; -1 if none).
    ``extremes``: also ``argmax`` / ``argmin`` (d_ffn,) torch long tensors on the model's device, the
    ``argmax``/``argmin`` of each value's logits (the memory tokens of composition, from the same product).
    """
    norms = write_values(model, layer, expert).float().norm(dim=0).cpu().numpy()
    d = norms.shape[0]
    top_n = min(top_n, model.vocab_size)
    out = {"top_ids": np.zeros((d, top_n), np.int64), "top_p": np.zeros((d, top_n), np.float32),
           "bottom_ids": np.zeros((d, top_n), np.int64), "max_p": np.zeros(d, np.float32),
           "lse": np.zeros(d, np.float32), "value_norm": np.zeros(d, np.float32),
           "target_rank": np.full(d, -1, np.int64)}
    out["value_norm"][:] = norms
    hi, lo = [], []
    for s in range(0, d, chunk):
        idx = torch.arange(s, min(s + chunk, d))
        logits = value_logits(model, layer, idx, norm=norm, expert=expert)  # (c, vocab)
        lse = torch.logsumexp(logits, dim=-1)
        top = logits.topk(top_n, dim=-1)
        out["top_ids"][s: s + len(idx)] = top.indices.cpu().numpy()
        out["top_p"][s: s + len(idx)] = (top.values - lse[:, None]).exp().cpu().numpy()
        out["max_p"][s: s + len(idx)] = out["top_p"][s: s + len(idx), 0]
        out["bottom_ids"][s: s + len(idx)] = logits.topk(top_n, dim=-1, largest=False).indices.cpu().numpy()
        out["lse"][s: s + len(idx)] = lse.cpu().numpy()
        if targets is not None:
            t = torch.as_tensor(targets[s: s + len(idx)], device=logits.device)
            ok = t >= 0
            tl = logits.gather(1, t.clamp(min=0)[:, None])
            # a - b > 0 iff a > b for floats (no difference of two distinct floats rounds to 0), and the
            # in-place test on the difference is twice as fast as building the comparison
            rank = (logits - tl).gt_(0).sum(1)
            out["target_rank"][s: s + len(idx)] = torch.where(ok, rank, -1).cpu().numpy()
        if extremes:
            hi.append(logits.argmax(-1))
            lo.append(logits.argmin(-1))
    if extremes:
        out["argmax"], out["argmin"] = torch.cat(hi), torch.cat(lo)
    return out


def agreement(top1: np.ndarray, next_ids: np.ndarray, n_random: int = 20, seed: int = 0) -> dict:
    """Agreement of value top tokens with trigger next tokens, and its permutation baseline.

    top1, next_ids: (d_ffn,). Keys whose top trigger has no next token (-1) are left out.
    rate = mean_i [top1_i == next_i];  random = mean over permutations pi of mean_i [top1_i == next_pi(i)].
    """
    ok = next_ids >= 0
    n = int(ok.sum())
    if n == 0:
        return {"n": 0, "rate": None, "random": None, "random_std": None}
    a, b = top1[ok], next_ids[ok]
    rng = np.random.default_rng(seed)
    rand = [float((a == b[rng.permutation(n)]).mean()) for _ in range(n_random)]
    return {"n": n, "rate": float((a == b).mean()), "random": float(np.mean(rand)),
            "random_std": float(np.std(rand))}


def analyze_values(atlas, norm: bool = False, top_n: int = 10, chunk: int = 1024, n_random: int = 20,
                   seed: int = 0, progress: bool = False, value_tokens: dict | None = None) -> tuple[dict, dict]:
    """Project every value of the atlas's model; agreement, ranks and the top-100 ``max p`` histogram.

    Returns ``(columns, summary)``: columns for ``values.parquet`` (one row per memory) and the per-layer
    summary for ``analysis/values.json``. ``value_tokens``: a dict to fill with ``layer -> (argmax, argmin)``
    of the value logits (:func:`ffkv.memory.composition.memory_tokens` from the same product, so the
    composition step need not project every value again).
    """
    model = atlas.model
    cols: dict[str, list] = {k: [] for k in ("layer", "index", "top_ids", "top_p", "bottom_ids", "max_p", "lse",
                                             "value_norm", "trigger_next_id", "trigger_next_rank")}
    layers = []
    for l in track(range(model.n_layers), desc="values", unit="layer", enabled=progress):
        nxt = atlas.next_tokens(l)
        pv = project_values(model, l, norm=norm, top_n=top_n, chunk=chunk, targets=nxt,
                            extremes=value_tokens is not None)
        if value_tokens is not None:
            value_tokens[l] = (pv.pop("argmax"), pv.pop("argmin"))
        d = model.d_ffn
        cols["layer"].append(np.full(d, l, np.int32))
        cols["index"].append(np.arange(d, dtype=np.int32))
        for k in ("top_ids", "top_p", "bottom_ids"):
            cols[k].extend(list(pv[k]))
        for k in ("max_p", "lse", "value_norm"):
            cols[k].append(pv[k])
        cols["trigger_next_id"].append(nxt)
        cols["trigger_next_rank"].append(pv["target_rank"])
        ag = agreement(pv["top_ids"][:, 0], nxt, n_random=n_random, seed=seed + l)
        ranks = pv["target_rank"][pv["target_rank"] >= 0]
        layers.append({"layer": l, "agreement": ag["rate"], "random": ag["random"], "random_std": ag["random_std"],
                       "n_keys": ag["n"], "mean_max_p": float(pv["max_p"].mean()),
                       "median_trigger_rank": float(np.median(ranks)) if ranks.size else None,
                       "mean_trigger_rank": float(ranks.mean()) if ranks.size else None,
                       "trigger_in_top10": float((ranks < 10).mean()) if ranks.size else None})
    columns = {k: (np.concatenate(v) if k in ("layer", "index", "max_p", "lse", "value_norm", "trigger_next_id",
                                              "trigger_next_rank") else v) for k, v in cols.items()}
    maxp, lay = columns["max_p"], columns["layer"]
    top100 = np.argsort(-maxp, kind="stable")[:100]
    hist = np.bincount(lay[top100], minlength=model.n_layers)
    for rec in layers:
        rec["top100_max_p_count"] = int(hist[rec["layer"]])
    summary = {"norm": norm, "vocab_size": model.vocab_size, "chance": 1.0 / model.vocab_size, "layers": layers,
               "top100_max_p_histogram": hist.tolist()}
    return columns, summary


def values_arrow(columns: dict):
    import pyarrow as pa

    def lists(rows, typ):  # (n, top_n) rows as one list column, without a Python loop over memories
        m = np.asarray(np.stack(rows), dtype=typ)
        offsets = pa.array(np.arange(0, m.size + 1, max(m.shape[1], 1), dtype=np.int32)[: m.shape[0] + 1])
        return pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1)))

    top = np.stack(columns["top_ids"])
    return pa.table({
        "layer": pa.array(columns["layer"]), "index": pa.array(columns["index"]),
        "top_ids": lists(columns["top_ids"], np.int32),
        "top_p": lists(columns["top_p"], np.float32),
        "bottom_ids": lists(columns["bottom_ids"], np.int32),
        "max_p": pa.array(columns["max_p"]), "lse": pa.array(columns["lse"]),
        "value_norm": pa.array(columns["value_norm"]),
        "trigger_next_id": pa.array(columns["trigger_next_id"]),
        "trigger_next_rank": pa.array(columns["trigger_next_rank"]),
        "agrees": pa.array(top[:, 0].astype(np.int64) == columns["trigger_next_id"]),
    })


# --------------------------------------------------------------------------------------------- queries
def token_id(model, token: str | int) -> int:
    """A vocabulary id from an id, an exact vocabulary entry, or a word (its first token, with a leading
    space if the tokenizer marks word starts); unknown -> FfkvError."""
    if isinstance(token, str) and not token.strip():
        raise FfkvError("the token is empty", "pass a word, a vocabulary entry or a token id")
    if isinstance(token, int) or (isinstance(token, str) and token.isdigit() and model.tokenizer is None):
        t = int(token)
        if not 0 <= t < model.vocab_size:
            raise FfkvError(f"token id {t} is out of range", f"use 0..{model.vocab_size - 1}")
        return t
    tok = model._require_tokenizer()
    vocab = tok.get_vocab()
    for cand in (token, "Ġ" + token.lstrip(" ") if token.startswith(" ") else None, "Ġ" + token, "▁" + token):
        if cand is not None and cand in vocab:
            return vocab[cand]
    ids = tok(token, add_special_tokens=False)["input_ids"]
    unk = tok.unk_token_id
    if len(ids) == 1 and ids[0] != unk:
        return ids[0]
    raise FfkvError(f"token {token!r} is not in the vocabulary"
                    + (f" (it splits into {len(ids)} tokens)" if len(ids) > 1 else ""),
                    "pass one vocabulary entry (e.g. ' Paris' with its leading space) or a token id")


@torch.no_grad()
def promotes(model, token: str | int, n: int = 20, norm: bool = False, layers=None, chunk: int = 1024) -> list[dict]:
    """Memories whose values give ``token`` the highest probability ``p_i(t) = softmax(E v_i)[t]``.

    Chunked like :func:`project_values`. Returns the n best over all layers (on an MoE model over every
    expert and shared expert of them, :func:`ffns`): memory, layer, index, p and the token's rank in the
    value's distribution (0 = its top token); expert memories also carry ``expert``.
    """
    t = token_id(model, token)
    rows = []
    for l, e in ffns(model, layers):
        d = write_values(model, l, e).shape[1]
        p_parts, r_parts = [], []
        for s in range(0, d, chunk):
            logits = value_logits(model, l, torch.arange(s, min(s + chunk, d)), norm=norm, expert=e)
            lt = logits[:, t]
            p_parts.append((lt - torch.logsumexp(logits, -1)).exp().cpu())
            r_parts.append((logits > lt[:, None]).sum(1).cpu())
        p, rank = torch.cat(p_parts), torch.cat(r_parts)
        best = p.topk(min(n, p.numel()))
        rows += [_row(l, i, e, p=pi, rank=int(rank[i])) for pi, i in zip(best.values.tolist(), best.indices.tolist())]
    rows.sort(key=lambda r: (-r["p"], r["layer"], -1 if r.get("expert") is None else r["expert"], r["index"]))
    return rows[:n]


def _row(layer: int, index: int, expert: int | None, **fields) -> dict:
    """A result row naming one memory; ``expert`` only for expert memories (dense rows are unchanged)."""
    row = {"memory": str(MemoryId(layer, index, expert)), "layer": layer, "index": index}
    if expert is not None:
        row["expert"] = expert
    return {**row, **fields}


@torch.no_grad()
def nearest_values(model, vector: torch.Tensor, n: int = 20, layers=None, expert: int | None = None) -> list[dict]:
    """Memories whose values (as they write into the residual) are closest (cosine) to ``vector`` (d_model,).

    On an MoE model the search runs over every FFN of ``layers`` (:func:`ffns`: each expert, the shared
    expert, dense layers); ``expert=e`` keeps only expert e of each of those layers (within one expert)."""
    vec = torch.as_tensor(vector, dtype=torch.float32).reshape(-1).to(model.device)
    if vec.numel() != model.d_model:
        raise FfkvError(f"vector has {vec.numel()} dimensions, the model's residual has {model.d_model}",
                        "pass a d_model-sized vector")
    vec = vec / vec.norm().clamp_min(1e-12)
    units = ffns(model, layers)
    if expert is not None:
        units = [(l, e) for l, e in units if e == expert]
        if not units:
            raise FfkvError(f"no layer searched has an expert {expert}", "name an expert of an MoE layer")
    rows = []
    for l, e in units:
        V = write_values(model, l, e).float()  # (d_model, F)
        cos = (vec @ V) / V.norm(dim=0).clamp_min(1e-12)
        best = cos.topk(min(n, cos.numel()))
        rows += [_row(l, i, e, cosine=c) for c, i in zip(best.values.tolist(), best.indices.tolist())]
    rows.sort(key=lambda r: -r["cosine"])
    return rows[:n]


def decode_tokens(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]
