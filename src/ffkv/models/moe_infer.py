"""Mixture-of-experts adapters inferred from the module structure (for MoE families without a hand-written spec).

:func:`infer_moe_spec` reads a built causal LM (a ``meta``-device build is enough) the way
:mod:`ffkv.models.infer` reads a dense one, and returns the pair :mod:`ffkv.models.moe` runs on:

* the decoder-layer list whose layers hold a **fused experts module**: two 3-D parameters
  ``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F), called as ``experts(x, top_k_index, top_k_weights)``
  (transformers 5's layout; its flags ``is_transposed`` / ``has_bias`` / ... are checked by :func:`check_moe`);
* the MoE block (the experts' parent), its **router** (the module in the block with a (E, D) ``weight``), a
  **shared expert** (a gated MLP in the block, D -> F -> D) and its sigmoid gate (a Linear (1, D)), if any;
* dense layers mixed in (DeepSeek's ``first_k_dense_replace``, Qwen's ``mlp_only_layers``,
  ``decoder_sparse_step``): the same block path holding a gated MLP instead of experts;
* the norms, embedding, final norm, unembedding, residual and logit scaling (config fields).

The **routing rule** is not guessed from names: :func:`select_routing` runs the model once, records the
``(top_k_index, top_k_weights)`` its own block hands to the experts, and keeps the first of ffkv's exact
rules (:meth:`MoEModel.route`: softmax or sigmoid scores, optional score-correction bias and grouped top-k,
renormalised or not, routed scaling factor from the router / config) that reproduces it at every MoE layer
within the check's tolerance. Then :func:`check_moe` runs in full. What no rule reproduces, or what fails the
check, is refused in one line (:class:`ffkv.models.infer.Refusal`).
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import replace

import torch
from torch import nn

from ..errors import AdapterCheckFailed
from .infer import ATTN_NAMES, POST_FFN_WORDS, PRE_ATTN_WORDS, PRE_FFN_WORDS, Refusal
from .moe import MoEModel, MoESpec, _by_expert, _err, _layout_problem, _tolerance, check_moe
from .spec import ArchSpec, get_path

__all__ = ["infer_moe_spec", "select_routing", "moe_from_hf", "routing_candidates", "describe_routing"]

MOE = "mixture-of-experts"
FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower()


def _paths(root: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, mod in root.named_modules(remove_duplicate=False):
        out.setdefault(id(mod), name)
    return out


def _fused_experts(m: nn.Module) -> bool:
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def _experts_in(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if n and _fused_experts(m)]


def _gated_mlp(m: nn.Module, d_model: int) -> dict | None:
    """``{key, up, value, act}`` child names of a gated MLP (D -> F twice, F -> D), else None."""
    lin = {n: c.weight.shape for n, c in m.named_children()
           if isinstance(c, nn.Linear) and c.weight.dim() == 2}
    outs = [n for n, s in lin.items() if s[0] == d_model and s[1] != d_model] or \
        [n for n, s in lin.items() if s[0] == d_model and "down" in n]
    if len(outs) != 1:
        return None
    F = lin[outs[0]][1]
    ins = [n for n, s in lin.items() if s == (F, d_model) and n != outs[0]]
    gate = [n for n in ins if "gate" in n or n == "w1"]
    acts = [n for n, c in m.named_children() if n not in lin and not _is_norm(c) and not list(c.parameters())
            and any(w in (n + type(c).__name__).lower() for w in ("act", "silu", "gelu", "relu", "swish"))]
    if len(ins) != 2 or len(gate) != 1 or len(acts) != 1:
        return None
    return {"key": gate[0], "up": next(n for n in ins if n != gate[0]), "value": outs[0], "act": acts[0]}


def _layer_list(hf_model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = None
    for name, mod in hf_model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not len(mod):
            continue
        low = name.lower()
        if any(w in low for w in ("vision", "audio", "visual", "tower")) and "language_model" not in low:
            continue
        n_moe = sum(1 for layer in mod if _experts_in(layer))
        if n_moe and (best is None or n_moe > best[0]):
            best = (n_moe, name, mod)
    if best is None:
        raise Refusal(hf_model.config.model_type, MOE, "its experts are not fused 3-D gate_up_proj / down_proj "
                      "tensors (" + _moe_class(hf_model) + "), the only expert layout ffkv reads")
    return best[1], best[2]


def _moe_class(hf_model: nn.Module) -> str:
    names = [type(m).__name__ for m in hf_model.modules()
             if any(w in type(m).__name__.lower() for w in ("expert", "moe"))]
    return names[0] if names else "no experts module"


def infer_moe_spec(hf_model: nn.Module) -> tuple[ArchSpec, MoESpec]:
    """The ``(ArchSpec, MoESpec)`` of a built MoE causal LM, from its modules (see the module docstring).

    The routing rule is left at softmax top-k: :func:`select_routing` picks it from a forward pass.
    Raises :class:`~ffkv.models.infer.Refusal` (reason "mixture-of-experts" or "structure") naming why.
    """
    config = hf_model.config
    mt = config.model_type
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def refuse(detail, reason=MOE):
        raise Refusal(mt, reason, detail, "use a mixture-of-experts model with fused experts and a top-k router, "
                      "or a dense model")

    embed, unembed = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    if not isinstance(embed, nn.Module) or not isinstance(unembed, nn.Module):
        refuse("no token embedding or unembedding module", "structure")
    d_model = embed.weight.shape[1]
    layers_path, layers = _layer_list(hf_model)
    found = [_experts_in(layer) for layer in layers]
    moe_layers = [l for l, f in enumerate(found) if f]
    rel = {tuple(found[l]) for l in moe_layers}
    if len(rel) != 1 or len(next(iter(rel))) != 1:
        refuse(f"MoE layers keep their experts at different or several paths ({sorted(rel)[:2]})", "structure")
    experts = found[moe_layers[0]][0]
    block, _, experts_name = experts.rpartition(".")
    if not block:
        refuse("the experts module sits directly in the decoder layer, with no MoE block around it", "structure")
    l0 = layers[moe_layers[0]]
    ex0 = get_path(l0, experts)
    sig = list(inspect.signature(ex0.forward).parameters)
    if len(sig) != 3:
        refuse(f"its experts module ({type(ex0).__name__}) is not called as experts(x, top_k_index, "
               f"top_k_weights)")
    E = ex0.down_proj.shape[0]
    blk0 = get_path(l0, block)
    router = shared = shared_gate = None
    shared_parts = None
    for name, child in blk0.named_children():
        if name == experts_name:
            continue
        if _is_norm(child):
            refuse(f"its MoE block normalises inside ({name}: {type(child).__name__})")
        mlp = _gated_mlp(child, d_model)
        if mlp is not None:
            if shared is not None:
                refuse(f"its MoE block has two dense MLPs ({shared}, {name})")
            shared, shared_parts = name, mlp
            continue
        w = getattr(child, "weight", None)
        if isinstance(child, nn.Linear) and w.shape == (1, d_model):
            shared_gate = name
            continue
        inner = [(n, m) for n, m in child.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor) and tuple(m.weight.shape) == (E, d_model)]
        if inner and router is None:
            router = f"{name}.{inner[0][0]}" if inner[0][0] else name
            continue
        if list(child.parameters()):
            refuse(f"its MoE block has a module ffkv does not model ({name}: {type(child).__name__})")
    if router is None:
        refuse(f"no router with a ({E}, {d_model}) weight in its MoE block ({type(blk0).__name__})")
    if shared_gate is not None and shared is None:
        refuse("a shared-expert gate without a shared expert")
    # dense layers: the same block path holding a gated MLP
    dense_parts = None
    for l, layer in enumerate(layers):
        if l in moe_layers:
            continue
        mlp_mod = get_path(layer, block)
        parts = None if mlp_mod is None else _gated_mlp(mlp_mod, d_model)
        if parts is None or (dense_parts is not None and parts != dense_parts):
            refuse(f"layer {l} has neither experts nor a gated MLP at '{block}'", "structure")
        dense_parts = parts
    mixers = tuple(_mixer(layer, block.split(".")[0], refuse, l) for l, layer in enumerate(layers))
    attn = next((m for m in mixers if m in ATTN_NAMES), mixers[0])
    norms = [n for n, m in l0.named_children() if _is_norm(m)]
    post_ffn = next((n for n in norms if any(w in n for w in POST_FFN_WORDS)), None)
    pre_ffn = next((n for n in norms if not n.startswith("post") and any(w in n for w in PRE_FFN_WORDS)), None)
    pre_attn = next((n for n in norms if not n.startswith("post") and any(w in n for w in PRE_ATTN_WORDS)), None)
    post_attn = next((n for n in norms if n in ("post_self_attn_layernorm", "post_attn_layernorm",
                                                  "post_attention_norm", "attn_post_norm")), None)
    if post_attn is None and "post_attention_layernorm" in norms:
        # Llama's post_attention_layernorm is the pre-FFN norm; beside a post-FFN norm and a separate pre-FFN
        # norm (or no pre-norms at all: FlexOlmo) it normalises the attention output
        if post_ffn is not None and (pre_ffn is not None or pre_attn is None):
            post_attn = "post_attention_layernorm"
        elif pre_ffn is None:
            pre_ffn = "post_attention_layernorm"
    paths = _paths(hf_model)
    parent_path = layers_path.rpartition(".")[0]
    parent = get_path(hf_model, parent_path)
    final = next((n for n in FINAL_NORMS if isinstance(getattr(parent, n, None), nn.Module)), None)
    join = (lambda n: f"{parent_path}.{n}" if parent_path else n)
    d = dense_parts or {"key": "gate_proj", "up": "up_proj", "value": "down_proj", "act": "act_fn"}

    def num(name):
        v = getattr(text, name, None)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    hybrid = sorted(set(mixers) - {attn})
    notes = (f"mixture-of-experts inferred: router {block}.{router.split('.')[0]}, experts {experts}"
             + (f", shared expert {block}.{shared}" + (" (sigmoid gate)" if shared_gate else "") if shared else "")
             + (f", dense layers {[l for l in range(len(layers)) if l not in moe_layers]}"
                if len(moe_layers) < len(layers) else "")
             + (f", token mixers {attn} / {', '.join(hybrid)} by layer" if hybrid else "")
             + (f", writes through {post_ffn}" if post_ffn else ""))
    arch = ArchSpec(
        family=mt, model_types=(mt,), layers=layers_path, embed=paths[id(embed)], unembed=paths[id(unembed)],
        final_norm=join(final) if final else None, attn=attn, mlp=block,
        key=f"{block}.{d['key']}", up=f"{block}.{d['up']}", value=f"{block}.{d['value']}", act=f"{block}.{d['act']}",
        pre_attn_norm=pre_attn, pre_ffn_norm=pre_ffn, post_attn_norm=post_attn, post_ffn_norm=post_ffn,
        residual_scale="residual_multiplier" if num("residual_multiplier") else None,
        logit_scale="logit_scale" if num("logit_scale") else None,
        logit_divisor="logits_scaling" if num("logits_scaling") else None,
        softcap="final_logit_softcapping" if getattr(text, "final_logit_softcapping", None) else None,
        inferred=True, notes=notes)
    sp = shared_parts or {"key": "gate_proj", "up": "up_proj", "value": "down_proj", "act": "act_fn"}
    moe = MoESpec(
        family=mt, model_types=(mt,), block=block, router=f"{block}.{router}", experts=experts,
        act="act_fn", shared=f"{block}.{shared}" if shared else None,
        shared_gate=f"{block}.{shared_gate}" if shared_gate else None,
        shared_key=sp["key"], shared_up=sp["up"], shared_value=sp["value"], shared_act=sp["act"],
        mixers=None if len(set(mixers)) == 1 else mixers, norm_topk=False,
        top_k=_top_k(text, get_path(blk0, router)), inferred=True, notes=notes)
    return arch, moe


def _mixer(layer: nn.Module, block: str, refuse, l: int) -> str:
    """The one token-mixing module of a layer (attention, or a hybrid's linear attention / state-space
    mixer): the layer's only child with parameters that is neither a norm nor the MoE block / MLP."""
    named = dict(layer.named_children())
    attn = [n for n in ATTN_NAMES if n in named and list(named[n].parameters())]
    if len(attn) == 1:
        return attn[0]
    rest = [n for n, m in named.items() if n != block and not _is_norm(m) and list(m.parameters())]
    if len(rest) != 1:
        refuse(f"layer {l} has no single token mixer beside its MoE block ({', '.join(rest) or 'none'})",
               "structure")
    return rest[0]


def _top_k(text, router: nn.Module) -> int | None:
    for k in ("top_k", "num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"):
        for src in (router, text):
            v = getattr(src, k, None)
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
                v = v[0]
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def routing_candidates(model: MoEModel, base: MoESpec) -> list[MoESpec]:
    """ffkv's exact routing rules that fit this router's structure, most specific first.

    Scores softmax or sigmoid; a score-correction bias when the MoE block (router included, experts not)
    holds an (E,) / (1, E) tensor named ``*bias*``; groups ``n_group`` / ``topk_group`` from the router, the
    block or the config, scored by top-2 sum or max; renormalised or not; scaled by
    ``routed_scaling_factor`` / ``router_scaling_factor`` (router, block or config) or not.
    """
    l = model.moe_layers[0]
    block = model.module(l, base.block)
    router = model.module(l, base.router)
    E = model.n_experts(l)
    text = model.text_config
    biases = [f"{base.block}.{n}" for n, b in itertools.chain(block.named_buffers(), block.named_parameters())
              if "bias" in n.rpartition(".")[2] and b.numel() == E and b.dim() <= 2 and b is not
              getattr(router, "bias", None) and not n.startswith(base.experts[len(base.block) + 1:] + ".")]
    groups = [(1, 1)]
    for src in (router, block, text):
        ng = next((getattr(src, k) for k in ("n_group", "num_group", "num_expert_group") if
                   isinstance(getattr(src, k, None), int)), None)
        tg = getattr(src, "topk_group", None)
        if isinstance(ng, int) and ng > 1 and isinstance(tg, int):
            groups.insert(0, (ng, tg))
            break
    scale = next((float(getattr(src, k)) for src in (router, block, text)
                  for k in ("routed_scaling_factor", "router_scaling_factor")
                  if isinstance(getattr(src, k, None), (int, float)) and not isinstance(getattr(src, k), bool)), 1.0)
    out = []
    group_rules = [(ng, tg, gs) for ng, tg in groups for gs in (("top2sum", "max") if ng > 1 else ("top2sum",))]
    for rule, bias, (ng, tg, gs), norm, s in itertools.product(
            ("sigmoid", "softmax") if biases else ("softmax", "sigmoid"), biases + [None], group_rules,
            (True, False), sorted({scale, 1.0}, key=lambda v: v == 1.0)):
        out.append(replace(base, routing=rule, score_bias=bias, n_group=ng, topk_group=tg, group_score=gs,
                           norm_topk=norm,
                           norm_eps=1e-20 if rule == "sigmoid" and norm else 0.0, routed_scaling=s,
                           weights_in_dtype=True))
    return out


class _Routed:
    """What the model's own MoE blocks did in one pass: block input x (N, D) and the (index, weights) they
    handed to their experts, per MoE layer."""

    def __init__(self, model: MoEModel):
        self.model, self.x, self.route, self.handles = model, {}, {}, []
        for l in model.moe_layers:
            self.handles.append(model.module(l, model.moe_spec.block).register_forward_pre_hook(
                self._block(l), with_kwargs=True))
            self.handles.append(model.experts_module(l).register_forward_pre_hook(self._experts(l),
                                                                                  with_kwargs=True))

    def _block(self, l):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.x[l] = h.detach().reshape(-1, h.shape[-1])
        return hook

    def _experts(self, l):
        def hook(module, args, kwargs):
            vals = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments.values())
            self.route[l] = (vals[1].detach(), vals[2].detach())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def select_routing(model: MoEModel, seq_len: int = 8, batch: int = 2, seed: int = 1) -> MoESpec:
    """The first of :func:`routing_candidates` that reproduces, at every MoE layer, the top-k experts (as a
    set) and their weights (within the check's tolerance) that the model's own blocks computed on a random
    batch. Refuses (one line) when none does."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.vocab_size, getattr(model.text_config, "vocab_size", model.vocab_size))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(model.device)
    rec = _Routed(model)
    mt = model.config.model_type
    try:
        model.hf(input_ids=ids, use_cache=False)
    except Exception as e:  # a model that does not run on plain token ids: one line, never a traceback
        text = (str(e).strip().splitlines() or [""])[0][:120]
        raise Refusal(mt, "check-failed", f"the model does not run on plain token ids ({type(e).__name__}: "
                      f"{text})") from None
    finally:
        rec.close()
    if set(rec.route) != set(model.moe_layers):
        raise Refusal(mt, MOE, "its MoE blocks do not call their experts with the routing (top_k_index, "
                      "top_k_weights)")
    tol = _tolerance(model.dtype)
    base = model.moe_spec
    for cand in routing_candidates(model, base):
        model.moe_spec = cand
        try:
            ok = all(_same_route(model.route(l, rec.x[l]), rec.route[l], tol) for l in model.moe_layers)
        except (RuntimeError, IndexError, AttributeError, ValueError):
            ok = False
        if ok:
            return cand
    model.moe_spec = base
    router = type(model.router(model.moe_layers[0])).__name__
    raise Refusal(mt, MOE, f"the routing of its {router} matches none of ffkv's rules (softmax or sigmoid "
                  f"top-k, score-correction bias, grouped top-k, renormalisation, routed scaling)",
                  "this router's rule needs a hand-written MoESpec")


def describe_routing(m: MoESpec) -> str:
    """One line naming a routing rule, e.g. ``sigmoid top-2 + e_score_correction_bias, renormalised, x2.5``."""
    parts = [f"{m.routing} top-{m.top_k}" + (f" + {m.score_bias.rpartition('.')[2]}" if m.score_bias else "")]
    if m.n_group > 1:
        parts.append(f"best {m.topk_group} of {m.n_group} groups ({m.group_score})")
    parts.append("renormalised" if m.norm_topk else "not renormalised")
    if m.routed_scaling != 1.0:
        parts.append(f"x{m.routed_scaling:g}")
    return ", ".join(parts)


def _same_route(spec_route, own_route, tol: float) -> bool:
    (si, sw), (oi, ow) = spec_route, own_route
    if si.shape != oi.reshape(si.shape[0], -1).shape:
        return False
    (si, sw), (oi, ow) = _by_expert(si, sw), _by_expert(oi.reshape(si.shape), ow.reshape(sw.shape))
    if not si.equal(oi):
        return False
    err, scale = _err(sw, ow)
    return err <= tol * scale


def moe_from_hf(hf_model: nn.Module, tokenizer=None, name_or_path: str | None = None,
                check: bool = True) -> MoEModel:
    """Wrap an MoE causal LM with no hand-written spec: infer the spec, pick the routing rule, run
    :func:`check_moe`. A failure is one :class:`Refusal` line (reason "mixture-of-experts" or "check-failed")."""
    mt = hf_model.config.model_type
    arch, moe = infer_moe_spec(hf_model)
    mm = MoEModel(hf_model, tokenizer, spec=arch, name_or_path=name_or_path, moe_spec=moe)
    if moe.top_k is None:
        raise Refusal(mt, MOE, "its config names no top-k (num_experts_per_tok is None)",
                      "set num_experts_per_tok in the config")
    layout = next(((l, p) for l in mm.moe_layers if (p := _layout_problem(mm, l))), None)
    if layout is not None:  # refuse a layout the engine does not read before running anything
        raise Refusal(mt, MOE, f"layer {layout[0]}: {layout[1]}", "this expert layout needs its own engine in "
                      "ffkv.models.moe")
    mm.moe_spec = select_routing(mm)
    mm.spec = replace(arch, notes=f"{arch.notes}; routing: {describe_routing(mm.moe_spec)}")
    if not check:
        return mm
    try:
        mm.adapter_check = check_moe(mm, raise_on_fail=True)
    except AdapterCheckFailed as e:
        detail = e.problem.split(": ", 1)[-1] if ": " in e.problem else e.problem
        raise Refusal(mt, "check-failed", f"MoE check failed {detail}") from None
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        text = (str(e).strip().splitlines() or [""])[0][:120]
        raise Refusal(mt, "check-failed", f"MoE check failed: the model does not run on plain token ids "
                      f"({type(e).__name__}: {text})") from None
    return mm
