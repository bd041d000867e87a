"""An adapter spec for any decoder family, inferred from the model's module structure.

Hand-written specs (:data:`ffkv.models.adapters.SPECS`) win; for every other model type,
:func:`infer_spec` reads the built model (a ``meta``-device build is enough, so no weight is read):

* the decoder-layer ``ModuleList`` (the language model's, never a vision or audio tower's),
* per layer the attention and the FFN module, and inside the FFN the projections, told apart by name
  *and* shape: ``W_out`` maps ``d_ffn -> d_model``; ``W_in`` maps ``d_model -> d_ffn`` (two such: a gated
  FFN, ``gate`` by name; one ``d_model -> 2 d_ffn``: a fused gate-up projection),
* the activation module, the norms (pre-, post-attention and post-FFN), the embedding, the final norm and
  the unembedding, and the head's logit scaling and soft-capping from the config.

A spec is only inferred, never trusted: the load-time check (:mod:`ffkv.models.check`) accepts it. What
cannot be a key-value memory model is refused in one line naming why (:class:`Refusal`, ``reason`` one of
:data:`REASONS`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from ..errors import UnsupportedArchitecture
from .spec import ArchSpec, get_path

REASONS = {
    "no-ffn": "no FFN to read: state-space, linear-attention or recurrent layers",
    "encoder-decoder": "encoder-decoder (a decoder with cross-attention)",
    "mixture-of-experts": "mixture-of-experts layers whose routing or expert layout ffkv cannot read "
                          "(readable ones pass through ffkv.models.moe)",
    "post-layernorm": "post-LayerNorm layers (the FFN output is normalised together with the residual)",
    "structure": "a module structure ffkv cannot read as key-value memories",
    "check-failed": "inferred adapter failed the load-time check",
    "cannot-build": "transformers cannot build it tiny from its default config",
}


class Refusal(UnsupportedArchitecture):
    """A model type ffkv does not read as key-value memories; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, model_type: str, reason: str, detail: str, fix: str | None = None):
        self.model_type, self.reason, self.detail = model_type, reason, detail
        super().__init__(f"model type '{model_type}' is not supported: {detail}",
                         fix or "use a decoder-only transformer: ffkv reads memories from its FFN layers")


class MixtureOfExpertsRefusal(Refusal):
    """A mixture-of-experts model: its experts are read by :mod:`ffkv.models.moe`, not by a dense spec."""

    def __init__(self, model_type: str, detail: str):
        super().__init__(model_type, "mixture-of-experts",
                         f"mixture-of-experts layers ({detail}) are handled by ffkv.models.moe",
                         "load it with ffkv.models.moe, or use a dense model")


ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "multi_head_attention", "self_att", "mixer_attn")
MLP_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "mlp_block", "ff", "fc", "ffn_layer", "ffwd")
CROSS_NAMES = ("encoder_attn", "cross_attn", "crossattention", "cross_attention", "encoder_attention")
RECURRENT_WORDS = ("mamba", "mixer", "ssm", "rwkv", "linear_attn", "recurrent", "temporal", "mlstm", "slstm",
                   "retention", "deltanet", "lru", "conv")
HYBRID_WORDS = ("mamba", "ssm", "linear_attn", "mixer", "recurrent", "deltanet", "shortconv", "mlstm", "rwkv",
                "temporal_block")
GATE_WORDS = ("gate", "w1", "wi_0")
VALUE_NAMES = ("down_proj", "fc_out", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo", "proj_down", "output",
               "lin2", "out_proj")
ACT_WORDS = ("activation", "gelu", "silu", "relu", "tanh", "sigmoid", "swish", "mish", "xielu", "act")
POST_FFN_WORDS = ("post_feedforward", "post_mlp", "post_ffn", "ffn_post", "mlp_post", "post_norm2")
PRE_FFN_WORDS = ("pre_feedforward", "pre_mlp", "pre_ff", "ln_2", "norm_2", "final_layer_norm", "mlp_norm",
                 "ffn_norm", "layernorm2", "feedforward_layernorm", "channel_pre_norm", "ln2", "norm2")
PRE_ATTN_WORDS = ("input_layernorm", "ln_1", "norm_1", "attn_norm", "self_attn_layer_norm", "attention_layernorm",
                  "layernorm1", "ln1", "norm1")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm", "layer_norm")


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The ``*ForCausalLM`` of a config on the ``meta`` device (shapes, no storage); one-line refusal if
    transformers has no causal LM for it or cannot build it."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            reason = "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "structure"
            raise Refusal(config.model_type, reason, "transformers has no causal-LM class for it") from None
        raise Refusal(config.model_type, "cannot-build", f"transformers cannot build it ({_first_line(e)})") from None
    except Exception as e:  # a model class's own validation: one line, never a traceback
        raise Refusal(config.model_type, "cannot-build", f"transformers cannot build it ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:140]}" if text else type(e).__name__


def _number(config, name: str) -> bool:
    v = getattr(config, name, None)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _paths(root: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, mod in root.named_modules(remove_duplicate=False):
        out.setdefault(id(mod), name)
    return out


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower()


def _linear_shape(m: nn.Module) -> tuple[int, int, bool] | None:
    """``(in, out, conv1d)`` of a projection module (nn.Linear and subclasses, GPT-2's Conv1D)."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or isinstance(m, nn.Embedding):
        return None
    if type(m).__name__ == "Conv1D":
        return w.shape[0], w.shape[1], True
    if isinstance(m, nn.Linear) or "linear" in type(m).__name__.lower():
        return w.shape[1], w.shape[0], False
    return None


def _layer_list(hf_model: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the language model's, the largest by parameters among the candidates."""
    best = None
    for name, mod in hf_model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or not list(mod[0].children()):
            continue
        low = name.lower()
        if any(w in low for w in ("vision", "audio", "image", "visual", "patch", "tower", "vq")) \
                and "language_model" not in low and "decoder" not in low:
            continue
        if any(isinstance(m, nn.ModuleList) for m in mod[0].modules() if m is not mod[0]) and \
                not any(n in dict(mod[0].named_children()) for n in ATTN_NAMES + MLP_NAMES):
            continue  # a list of blocks of layers, not of layers
        size = sum(p.numel() for p in mod.parameters())
        key = (n_layers is not None and len(mod) == n_layers, size)
        if best is None or key > best[0]:
            best = (key, name, mod)
    if best is None:
        raise Refusal(hf_model.config.model_type, "structure", "no list of decoder layers was found")
    return best[1], best[2]


def _classify_layer(mt: str, layer: nn.Module, d_model: int, act_fn: str | None) -> dict:
    """Relative paths of one layer's attention, FFN projections, activation and norms (or a refusal)."""
    children = dict(layer.named_children())
    if any(n in children for n in CROSS_NAMES):
        raise Refusal(mt, "encoder-decoder", "encoder-decoder: its decoder layers have cross-attention")
    experts = [type(m).__name__ for m in layer.modules()
               if any(w in type(m).__name__.lower() for w in ("expert", "router", "sparsemoe", "moeblock", "moelayer"))
               or (type(m).__name__.lower().endswith(("moe", "moeblock")))]
    if experts:
        raise MixtureOfExpertsRefusal(mt, experts[0])
    if "intermediate" in children and "output" in children:
        raise Refusal(mt, "post-layernorm", "post-LayerNorm (BERT-style) layers: the FFN output is normalised "
                      "together with the residual, so no memory writes additively")
    attn = next((n for n in ATTN_NAMES if n in children), None)
    hybrid = [f"{n}:{type(m).__name__}" for n, m in children.items()
              if not _is_norm(m) and any(w in (n + type(m).__name__).lower() for w in HYBRID_WORDS)]
    if hybrid:
        raise Refusal(mt, "no-ffn", f"state-space / linear-attention / recurrent layers ({hybrid[0]})")
    if attn is None:
        kinds = [f"{n}:{type(m).__name__}" for n, m in children.items()
                 if not _is_norm(m) and any(w in (n + type(m).__name__).lower() for w in RECURRENT_WORDS)]
        if kinds:
            raise Refusal(mt, "no-ffn", f"no attention+FFN layer: state-space / linear-attention / recurrent "
                          f"layers ({kinds[0]})")
        raise Refusal(mt, "structure", f"no attention module in layer ({', '.join(children)[:80]})")
    mlp = next((n for n in MLP_NAMES if n in children and list(children[n].children())), None)
    container = children[mlp] if mlp else layer
    prefix = mlp + "." if mlp else ""
    linears = {n: _linear_shape(m) for n, m in container.named_children()}
    linears = {n: s for n, s in linears.items() if s is not None}
    if not mlp:
        linears = {n: s for n, s in linears.items() if n in ("fc1", "fc2", "fc_in", "fc_out", "w1", "w2", "w3",
                                                           "gate_proj", "up_proj", "down_proj")}
    outs = [n for n, (i, o, _) in linears.items() if o == d_model and i != d_model]
    if not outs:
        raise Refusal(mt, "no-ffn" if not mlp else "structure",
                      "no FFN output projection (d_ffn -> d_model) in its layers")
    value = outs[0] if len(outs) == 1 else next((n for n in VALUE_NAMES if n in outs), outs[0])
    d_ffn, conv1d = linears[value][0], linears[value][2]
    ins = [n for n, (i, o, _) in linears.items() if i == d_model and o == d_ffn]
    fused = [n for n, (i, o, _) in linears.items() if i == d_model and o == 2 * d_ffn]
    out = {"attn": attn, "value": prefix + value, "conv1d": conv1d, "up": None, "fused": False,
           "mlp": mlp or None, "d_ffn": d_ffn}
    if len(ins) == 2:
        gate = [n for n in ins if any(w in n.lower() for w in GATE_WORDS)]
        if len(gate) != 1:
            raise Refusal(mt, "structure", f"two input projections ({', '.join(ins)}) and no way to tell the gate")
        out["key"], out["up"] = prefix + gate[0], prefix + next(n for n in ins if n != gate[0])
    elif len(ins) == 1:
        out["key"] = prefix + ins[0]
    elif len(fused) == 1:
        out["key"], out["fused"] = prefix + fused[0], True
    else:
        raise Refusal(mt, "structure", "no FFN input projection (d_model -> d_ffn) in its layers")
    if not mlp:
        out["mlp"] = out["key"]
    acts = [n for n, m in container.named_children()
            if n not in linears and not isinstance(m, (nn.Dropout, nn.LayerNorm)) and not _is_norm(m)
            and any(w in (n + type(m).__name__).lower() for w in ACT_WORDS)]
    # An FFN that calls a functional activation: the config's hidden_act (the check decides).
    out["act"] = prefix + acts[0] if acts else None
    if not acts and act_fn is None:
        raise Refusal(mt, "structure", "the FFN has no activation module and the config names no hidden_act")
    norms = [n for n, m in children.items() if _is_norm(m)]
    post_ffn = next((n for n in norms if any(w in n for w in POST_FFN_WORDS)), None)
    pre_ffn = next((n for n in norms if any(w in n for w in PRE_FFN_WORDS)), None)
    pre_attn = next((n for n in norms if any(w in n for w in PRE_ATTN_WORDS)), None)
    post_attn = next((n for n in norms if n in ("post_self_attn_layernorm", "post_attn_layernorm",
                                                  "post_attention_norm", "attn_post_norm", "post_norm1")), None)
    if post_attn is None and "post_attention_layernorm" in norms:
        # Llama's post_attention_layernorm is the pre-FFN norm; in sandwich-norm layers (a post-FFN norm
        # beside a separate pre-FFN norm, or no pre-norms at all) it normalises the attention output.
        if post_ffn is not None and (pre_ffn is not None or pre_attn is None):
            post_attn = "post_attention_layernorm"
        elif pre_ffn is None:
            pre_ffn = "post_attention_layernorm"
    out.update(pre_attn=pre_attn, pre_ffn=pre_ffn, post_attn=post_attn, post_ffn=post_ffn)
    return out


def infer_spec(hf_model: nn.Module) -> ArchSpec:
    """Infer the spec of a built transformers causal LM from its modules (see the module docstring)."""
    config = hf_model.config
    mt = config.model_type
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False) and not hasattr(config, "text_config"):
        raise Refusal(mt, "encoder-decoder", "encoder-decoder model")
    embed = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    unembed = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if not isinstance(embed, nn.Module) or not isinstance(unembed, nn.Module):
        raise Refusal(mt, "structure", "no token embedding or unembedding module")
    d_model = embed.weight.shape[1] if getattr(embed, "weight", None) is not None else None
    if d_model is None:
        raise Refusal(mt, "structure", "the token embedding has no weight matrix")
    n_layers = next((getattr(text, k) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                     if isinstance(getattr(text, k, None), int)), None)
    layers_path, layers = _layer_list(hf_model, n_layers)
    act_fn = getattr(text, "hidden_act", None) or getattr(text, "activation_function", None)
    act_fn = act_fn if isinstance(act_fn, str) and act_fn in ACT2FN else None
    parts = [_classify_layer(mt, layer, d_model, act_fn) for layer in layers]
    first = parts[0]
    structural = ("attn", "mlp", "key", "up", "value", "fused", "act", "conv1d", "post_attn", "post_ffn")
    for l, p in enumerate(parts[1:], 1):
        diff = next((k for k in structural if p[k] != first[k]), None)
        if diff is not None:
            raise Refusal(mt, "structure", f"layer {l} differs from layer 0 ({diff}: {p[diff]} vs {first[diff]})")
    paths = _paths(hf_model)
    parent_path = layers_path.rpartition(".")[0]
    parent = get_path(hf_model, parent_path)
    final_norm = None
    norms = [(n, m) for n, m in parent.named_children() if _is_norm(m)]
    if norms:
        n = next((n for n in FINAL_NORM_NAMES if n in dict(norms)), norms[-1][0])
        final_norm = f"{parent_path}.{n}" if parent_path else n
    pos = [n for n, m in parent.named_children() if isinstance(m, nn.Embedding) and m is not embed]
    proj = "project_out" if isinstance(getattr(parent, "project_out", None), nn.Linear) else None
    join = (lambda n: f"{parent_path}.{n}" if parent_path else n)
    flags = [getattr(text, k, None) for k in ("use_parallel_residual", "parallel_attn", "parallel_residual")]
    flag = next((f for f in flags if isinstance(f, bool)), None)
    parallel = flag if flag is not None else (first["pre_ffn"] is None and first["pre_attn"] is not None
                                              and first["post_ffn"] is None)
    return ArchSpec(
        family=mt, model_types=(mt,), layers=layers_path, embed=paths[id(embed)], unembed=paths[id(unembed)],
        final_norm=final_norm, attn=first["attn"], mlp=first["mlp"], key=first["key"], value=first["value"],
        act=first["act"], act_fn=None if first["act"] else act_fn, up=first["up"], fused_gate_up=first["fused"], conv1d=first["conv1d"],
        pre_attn_norm=first["pre_attn"], pre_ffn_norm=first["pre_ffn"], post_attn_norm=first["post_attn"],
        post_ffn_norm=first["post_ffn"], pos_embed=join(pos[0]) if pos else None,
        final_proj=join(proj) if proj else None, parallel=bool(parallel),
        logit_scale="logit_scale" if isinstance(getattr(text, "logit_scale", None), (int, float)) else None,
        logit_divisor="logits_scaling" if isinstance(getattr(text, "logits_scaling", None), (int, float)) else None,
        residual_scale=("residual_multiplier" if _number(text, "residual_multiplier")
                        else "scale_depth" if _number(text, "scale_depth") else None),
        softcap="final_logit_softcapping" if getattr(text, "final_logit_softcapping", None) else None,
        inferred=True, notes="inferred from the module structure",
    )
