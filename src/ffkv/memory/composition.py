"""How memories compose a layer's output (Geva et al. 2021, section 5), measured over sampled prefixes.

Composition (5.1), per layer l and prefix x:
    active memories   A = {i : memory i is active at x}; the share |A| / d_ffn
    layer prediction  y^l = argmax E o^l,  o^l = sum_i m_i v_i + b  (the FFN output; in post-norm families
                      the write N(o^l) that reaches the residual, and v_i read as g ⊙ v_i, see values.py)
    memory prediction y_i = argmax E (m_i v_i) = argmax E v_i if m_i > 0, argmin E v_i if m_i < 0
    zero agreement    y^l differs from y_i for every i in A

"Active" (an explicit, recorded rule): ReLU -> m_i != 0; GELU and other non-gated activations -> m_i > 0,
i.e. the key's pre-activation is positive (GELU(z) > 0 iff z > 0); gated FFNs -> the gate pre-activation
``k_i . x > 0`` (read from the FFN input). ``active_threshold=t`` replaces all of these by ``|m_i| > t``.

Refinement (5.2), per layer: the residual before the FFN r^l = resid_post^l - o^l (o^l the write) and the layer output
r^l + o^l are read through the logit lens (final norm, then E); with Y the model's final prediction:
    residual-is-output  argmax E r^l == Y
    cases  residual     top(r+o) == top(r) != top(o)
           ffn          top(r+o) == top(o) != top(r)
           agreement    top(r+o) == top(r) == top(o)
           composition  top(r+o) differs from both
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.engine import run
from ..progress import track
from .corpus import CorpusSpec, iter_units
from .miner import batches, encode_units
from .patterns import is_stop_token
from .values import HeadScreen, write_values

SHORT_PREFIX = 5  # the paper's short prefixes: fewer than 5 tokens


def sample_units(model, spec: CorpusSpec, n_units: int = 200, pool: int = 20, seed: int = 0) -> list:
    """A seeded sample of ``n_units`` units from the first ``n_units * pool`` units of a corpus."""
    units = []
    for u in iter_units(model._require_tokenizer(), spec):
        units.append(u)
        if len(units) >= n_units * pool:
            break
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(units), size=min(n_units, len(units)), replace=False))
    return [units[i] for i in keep]


def activation_rule(model, layer: int) -> str:
    """"nonzero" (ReLU), "positive" (GELU-like: m > 0 iff pre-activation > 0) or "gate" (gated FFNs)."""
    if model.gated:
        return "gate"
    act = model.activation(layer)
    name = type(act).__name__.lower() + str(getattr(act, "act", "")).lower()
    return "nonzero" if "relu" in name and "gelu" not in name else "positive"


@torch.no_grad()
def memory_tokens(model, norm: bool = False, screen: HeadScreen | None = None) -> dict:
    """Per layer, (d_ffn,) top-1 and bottom-1 token of ``E v_i``: y_i for positive / negative m_i
    (``argmax`` / ``argmin`` of :func:`~ffkv.memory.values.value_logits`, through :class:`HeadScreen`)."""
    screen = HeadScreen(model) if screen is None else screen
    out = {}
    for l in range(model.n_layers):
        V = write_values(model, l).T  # (d_ffn, d_model)
        out[l] = (screen.top1(V, norm=norm), screen.top1(V, norm=norm, largest=False))
    return out


def _rate(mask: np.ndarray, of: np.ndarray) -> float | None:
    return float(mask[of].mean()) if of.any() else None


@torch.no_grad()
def composition_and_refinement(model, units: list, norm: bool = False, active_threshold: float | None = None,
                               batch_tokens: int = 1024, progress: bool = False, value_tokens: dict | None = None,
                               screen: HeadScreen | None = None) -> dict:
    """Both analyses of section 5 over every position of ``units`` (see module docstring).

    Every prediction is an ``argmax`` of the family's head (:meth:`MemoryModel.unembed`), computed by
    :class:`~ffkv.memory.values.HeadScreen` (exact, screened with a bfloat16 product where that pays), all
    layers of a batch in one call per norm setting; the model's final prediction Y is the head of the last
    layer's residual (what the model's own head computes), so the body runs without its LM head.
    ``value_tokens``: :func:`memory_tokens` already computed (``analyze`` passes the values step's).
    """
    L = model.n_layers
    screen = HeadScreen(model) if screen is None else screen
    mem = memory_tokens(model, norm=norm, screen=screen) if value_tokens is None else value_tokens
    rules = {l: activation_rule(model, l) for l in range(L)}
    tok = model._require_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    stop_of_id: dict[int, bool] = {}
    acc = {l: {k: [] for k in ("active", "zero", "has_active", "res_is_out", "case")} for l in range(L)}
    stop_all, short_all = [], []
    it = track(list(batches(iter(units), batch_tokens, max(len(u.tokens) for u in units))), desc="composition",
               unit="batch", enabled=progress)
    reads = [(s, l) for l in range(L) for s in ("coef", "ffn_out", "resid_post")]
    if any(r == "gate" for r in rules.values()):
        reads += [("ffn_in", l) for l in range(L)]
    for batch in it:
        ids, mask = encode_units(batch, pad, model.device)
        rec = run(model, ids, attention_mask=mask, reads=reads, head="none").rec
        sel = _prefix_flags(ids, mask, tok, stop_of_id, stop_all, short_all)
        n = sel.numel()
        take = lambda s, l: rec[s, l].reshape(-1, rec[s, l].shape[-1])[sel]  # noqa: E731
        ys = [take("resid_post", l) for l in range(L)]
        os_ = [model.write_from_ffn_out(l, take("ffn_out", l)) for l in range(L)]  # what each FFN added
        # one head call per norm setting for every layer of the batch: r = y - o, y, o (lens) [, o (raw)]
        lens = screen.top1(torch.cat([y - o for y, o in zip(ys, os_)] + ys + os_), norm=True).reshape(3, L, n)
        raw = lens[2] if norm else screen.top1(torch.cat(os_), norm=norm).reshape(L, n)
        final = lens[1, L - 1]
        for l in range(L):
            m = take("coef", l).float()
            active = _active(model, rules[l], l, m, lambda: take("ffn_in", l), active_threshold)
            _accumulate(acc[l], active, m, mem[l], raw[l], lens[0, l], lens[1, l], lens[2, l], final)
    return _summary(acc, stop_all, short_all, rules, active_threshold, len(units), norm)


def _prefix_flags(ids, mask, tok, stop_of_id: dict, stop_all: list, short_all: list) -> torch.Tensor:
    """The flat indices of a batch's real tokens (B*T,); appends their stop-word and short-prefix flags."""
    sel = mask.reshape(-1).nonzero().squeeze(1)
    flat_ids = ids.reshape(-1)[sel].tolist()
    for t in set(flat_ids) - stop_of_id.keys():
        stop_of_id[t] = is_stop_token(tok.decode([t]))
    stop_all.append(np.array([stop_of_id[t] for t in flat_ids]))
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).reshape(-1)[sel]
    short_all.append((pos + 1 < SHORT_PREFIX).cpu().numpy())
    return sel


def _active(model, rule: str, layer: int, m: torch.Tensor, ffn_in, active_threshold: float | None):
    """(n, d_ffn) bool: the active memories at each prefix (module docstring); ``ffn_in()`` gives the FFN input."""
    if active_threshold is not None:
        return m.abs() > active_threshold
    if rule == "nonzero":
        return m != 0
    if rule == "positive":
        return m > 0
    return torch.nn.functional.linear(ffn_in(), model.keys(layer), model.key_bias(layer)) > 0


def _accumulate(a: dict, active, m, mem, pred_o, pred_r, pred_y, pred_on, final) -> None:
    """Append one layer's per-prefix records of a batch: (n,) predictions, (n, d_ffn) active and m."""
    top1, bot1 = mem
    y_i = torch.where(m > 0, top1[None, :], bot1[None, :])
    agree = (active & (y_i == pred_o[:, None])).any(1)
    has = active.any(1)
    case = torch.full_like(pred_y, 3)  # composition
    case[(pred_y == pred_r) & (pred_y != pred_on)] = 0  # residual
    case[(pred_y == pred_on) & (pred_y != pred_r)] = 1  # ffn
    case[(pred_y == pred_r) & (pred_y == pred_on)] = 2  # agreement
    a["active"].append(active.float().mean(1).cpu().numpy())
    a["zero"].append((~agree).cpu().numpy())
    a["has_active"].append(has.cpu().numpy())
    a["res_is_out"].append((pred_r == final).cpu().numpy())
    a["case"].append(case.cpu().numpy())


def _summary(acc: dict, stop_all: list, short_all: list, rules: dict, active_threshold, n_units: int,
             norm: bool) -> dict:
    """The result dict of :func:`composition_and_refinement` from its accumulated records."""
    L = len(acc)
    stop, short = np.concatenate(stop_all), np.concatenate(short_all)
    comp, refine = [], []
    for l in range(L):
        a = {k: np.concatenate(v) for k, v in acc[l].items()}
        has, zero = a["has_active"], a["zero"]
        zero_cases = zero & has
        comp.append({
            "layer": l, "rule": "abs>%g" % active_threshold if active_threshold is not None else rules[l],
            "active_share": float(a["active"].mean()), "active_share_std": float(a["active"].std()),
            "no_active": float((~has).mean()),
            "zero_agreement": _rate(zero, has),
            "zero_agreement_stop_word": _rate(zero, has & stop),
            "zero_agreement_content_word": _rate(zero, has & ~stop),
            "zero_agreement_short": _rate(zero, has & short),
            "zero_agreement_long": _rate(zero, has & ~short),
            "zero_cases_stop_word_share": _rate(stop, zero_cases),
            "zero_cases_short_share": _rate(short, zero_cases),
        })
        case = a["case"]
        refine.append({"layer": l, "residual_is_output": float(a["res_is_out"].mean()),
                       **{name: float((case == c).mean()) for c, name in
                          enumerate(("residual", "ffn", "agreement", "composition"))}})
    return {"n_prefixes": int(stop.size), "n_units": n_units, "norm": norm,
            "stop_word_share": float(stop.mean()), "short_share": float(short.mean()),
            "composition": comp, "refinement": refine}
