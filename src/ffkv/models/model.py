"""A Hugging Face causal LM seen as a stack of key-value memories.

:class:`MemoryModel` wraps the transformers model (``.hf``), its tokenizer and its :class:`ArchSpec`,
and gives every capability the same vocabulary: keys, values, coefficients, the logit lens.
It adds no parameters and changes nothing in the model; hooks live in :mod:`ffkv.models.hooks`.

Conventions (all tensors in the model's dtype and device unless said otherwise):
    keys(l)        (d_ffn, d_model)   row i is key k_i (W_in; W_gate for gated FFNs)
    up_keys(l)     (d_ffn, d_model)   W_up rows, gated FFNs only
    values(l)      (d_model, d_ffn)   column i is value v_i (W_out)
    value_bias(l)  (d_model,) | None
    coefficients   (..., d_ffn)       m(x), the input of W_out
    ffn_out        (..., d_model)     W_out m + b = sum_i m_i v_i + b (site "ffn_out")
    write          (..., d_model)     what the FFN adds to the residual (site "ffn_write"):
                                      post_ffn_norm(ffn_out) in post-norm families (Gemma-2/3, OLMo-2),
                                      ffn_out itself everywhere else
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..errors import FfkvError
from .adapters import ArchSpec, get_path, spec_for

# Config fields that bound a model's input length, in the order the one rule reads them.
CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length",
                  "max_seq_len", "context_length")
DEFAULT_CONTEXT = 1024  # a config that names no bound (relative positions, recurrences): ROME's window


class MemoryModel:
    """The key-value view of one causal LM. Build it with :func:`ffkv.load_model` or
    :func:`ffkv.models.loading.from_hf` (both run the adapter check); ``MemoryModel(hf)`` runs none.

    ``spec`` defaults to the family's hand-written spec, else one inferred from the module structure
    (:func:`ffkv.models.infer.spec_for`). ``adapter_check`` holds the check's result dict once run.
    """

    def __init__(self, hf_model: nn.Module, tokenizer=None, spec: ArchSpec | None = None,
                 name_or_path: str | None = None):
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.config = hf_model.config
        self.spec = spec or spec_for(hf_model)
        self.adapter_check: dict | None = None
        self.name_or_path = name_or_path or getattr(self.config, "_name_or_path", "") or "<in-memory>"
        self._layers = get_path(hf_model, self.spec.layers)
        if self._layers is None:
            raise FfkvError(
                f"{self.spec.family} model has no layer list at '{self.spec.layers}'",
                "this transformers version may have renamed it; please report the model type",
            )
        for what in ("embed", "unembed"):
            if get_path(hf_model, getattr(self.spec, what)) is None:
                raise FfkvError(f"{self.spec.family} model has no {what} module at "
                                f"'{getattr(self.spec, what)}'", "please report the model type")
        self.hf.eval()

    # ----------------------------------------------------------------------------- shapes
    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def d_model(self) -> int:
        return self.embedding.weight.shape[1]

    @property
    def d_ffn(self) -> int:
        return self.values(0).shape[1]

    @property
    def vocab_size(self) -> int:
        return self.unembedding.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def gated(self) -> bool:
        return self.spec.gated

    def __repr__(self):
        return (f"MemoryModel({self.name_or_path!r}, family={self.family}, layers={self.n_layers}, "
                f"d_model={self.d_model}, d_ffn={self.d_ffn}, gated={self.gated})")

    @property
    def text_config(self):
        """The language model's config (``config.text_config`` of multimodal wrappers, else ``config``)."""
        cfg = self.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def context_length(self) -> int:
        """The longest input the model takes: **the one context-length rule of ffkv**.

        The first positive integer among the text config's :data:`CONTEXT_FIELDS` (``n_positions``,
        ``max_position_embeddings``, ``n_ctx``, ``seq_length``, ...; ``None`` fields are skipped), else the
        tokenizer's ``model_max_length`` when it is a real bound, else :data:`DEFAULT_CONTEXT` (1024).
        """
        cfg = self.text_config
        for name in CONTEXT_FIELDS:
            v = getattr(cfg, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        n = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(n, int) and 0 < n < 10**7:
            return n
        return DEFAULT_CONTEXT

    @property
    def tokenizer_vocab_size(self) -> int | None:
        """Tokens the tokenizer can produce (``len(tokenizer)``, added tokens included); None without one.

        Less than :attr:`vocab_size` for padded vocabularies (Pythia pads to a multiple of 128): the extra
        unembedding rows are tokens no text maps to.
        """
        return None if self.tokenizer is None else len(self.tokenizer)

    @property
    def padded_vocab_rows(self) -> int:
        """Unembedding rows beyond the tokenizer's tokens (0 without a tokenizer or when they agree)."""
        n = self.tokenizer_vocab_size
        return 0 if n is None else max(0, self.vocab_size - n)

    @property
    def identity(self) -> dict:
        """Who this model is, for result files: name, type, shapes and a fingerprint of its weights."""
        return {
            "name_or_path": str(self.name_or_path),
            "model_type": self.config.model_type,
            "family": self.family,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_ffn": self.d_ffn,
            "vocab_size": self.vocab_size,
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "fingerprint": weights_fingerprint(self.hf),
        }

    # ----------------------------------------------------------------------------- modules
    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative counts from the top); returns it non-negative."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise FfkvError(f"layer must be an integer, got {layer!r}", f"use 0..{self.n_layers - 1}")
        if not -self.n_layers <= layer < self.n_layers:
            raise FfkvError(f"layer {layer} is out of range for a {self.n_layers}-layer model",
                            f"use 0..{self.n_layers - 1}")
        return layer % self.n_layers

    def layer(self, layer: int) -> nn.Module:
        return self._layers[self.check_layer(layer)]

    def module(self, layer: int, path: str) -> nn.Module:
        mod = get_path(self.layer(layer), path)
        if mod is None:
            raise FfkvError(f"{self.family} layer {layer} has no module '{path}'", "please report the model")
        return mod

    @property
    def embedding(self) -> nn.Module:
        return get_path(self.hf, self.spec.embed)

    @property
    def unembedding(self) -> nn.Module:
        return get_path(self.hf, self.spec.unembed)

    @property
    def final_norm(self) -> nn.Module | None:
        return get_path(self.hf, self.spec.final_norm)

    def post_norm(self, layer: int) -> nn.Module | None:
        """The post-FFN norm through which layer ``layer``'s FFN writes into the residual, or None."""
        return None if self.spec.post_ffn_norm is None else self.module(layer, self.spec.post_ffn_norm)

    @torch.no_grad()
    def post_norm_gain(self, layer: int) -> torch.Tensor | None:
        """The post-FFN norm's per-dimension gain g (d_model,), or None without a post norm.

        Read off the norm itself as ``N(1)`` (an RMS norm maps the all-ones vector, whose RMS is 1, to its
        gain up to ``1/sqrt(1 + eps)``), so Gemma's ``(1 + w)`` and OLMo-2's ``w`` need no per-family code.
        """
        norm = self.post_norm(layer)
        if norm is None:
            return None
        return norm(torch.ones(self.d_model, dtype=self.dtype, device=self.device))

    def write_values(self, layer: int) -> torch.Tensor:
        """The values as they write into the residual, (d_model, d_ffn): column i is ``g ⊙ v_i``.

        ``g`` is the post-FFN norm's gain (:meth:`post_norm_gain`); without a post norm this is
        :meth:`values` itself (a view), times :attr:`residual_scale` where the family scales its writes. In a post-norm family the write ``N(o)``, ``o = sum_i m_i v_i + b``,
        depends on a value only through the RMS norm's local Jacobian

            d N(o) / d m_i = g ⊙ (v_i - (o · v_i) / (d r^2) o) / r,     r^2 = mean(o^2) + eps;

        dropping the positive per-token factor ``1/r`` and the component along ``o``, memory i moves the
        residual along ``g ⊙ v_i``. Value projections, sub-updates and composition read these.
        """
        gain = self.post_norm_gain(layer)
        v = self.values(layer)
        v = v if gain is None else v * gain[:, None]
        return v if self.residual_scale == 1.0 else v * self.residual_scale

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        """The post-attention norm of sandwich-norm families (Gemma-2/3, OLMo-2), or None."""
        return None if self.spec.post_attn_norm is None else self.module(layer, self.spec.post_attn_norm)

    @property
    def residual_scale(self) -> float:
        """The factor both sub-blocks' outputs are scaled by before they are added to the residual: 1, or
        Granite's / HyperCLOVA X's ``residual_multiplier``, MiniCPM's ``scale_depth / sqrt(n_layers)``."""
        name, cfg = self.spec.residual_scale, self.text_config
        if name is None:
            return 1.0
        if name == "scale_depth":
            return float(cfg.scale_depth) / float(cfg.num_hidden_layers) ** 0.5
        return float(getattr(cfg, name))

    def write_from_ffn_out(self, layer: int, ffn_out: torch.Tensor) -> torch.Tensor:
        """What the FFN adds to the residual: ``s · post_ffn_norm(ffn_out)``, or ``s · ffn_out`` (no post norm),
        with ``s`` the :attr:`residual_scale` (1 for nearly every family).

        ffn_out: (..., d_model) -> (..., d_model). ``ffn_out`` is ``W_out m + b`` (site "ffn_out").
        """
        norm = self.post_norm(layer)
        out = ffn_out if norm is None else norm(ffn_out)
        s = self.residual_scale
        return out if s == 1.0 else out * s

    def attn_write_from_attn_out(self, layer: int, attn_out: torch.Tensor,
                                 resid_pre: torch.Tensor | None = None) -> torch.Tensor:
        """What attention adds to the residual: ``post_attn_norm(attn_out)``, or ``attn_out``; for families
        whose attention module adds the residual itself (BLOOM), ``attn_out - resid_pre``."""
        norm = self.attn_post_norm(layer)
        out = attn_out if norm is None else norm(attn_out)
        if self.residual_scale != 1.0:
            out = out * self.residual_scale
        if self.spec.attn_adds_residual:
            if resid_pre is None:
                raise FfkvError(f"{self.family}'s attention output includes the residual",
                                "pass resid_pre to subtract it")
            out = out - resid_pre
        return out

    def site_module(self, site: str, layer: int | None) -> tuple[nn.Module, str]:
        """``(module, kind)`` where a hook site lives: kind "pre" reads/rewrites the module's first input,
        "post" its first output. See :data:`ffkv.models.hooks.SITES` for the sites.

        "ffn_out" is always the output of ``W_out`` (``sum_i m_i v_i + b``); "ffn_write" is what the FFN
        adds to the residual: the output of the post-FFN norm where the family has one, else of ``W_out``
        (times :attr:`residual_scale`, applied by the model after the module, in Granite and MiniCPM).
        """
        s = self.spec
        table = {
            "embed": lambda: (self.embedding, "post"),
            "resid_pre": lambda: (self.layer(layer), "pre"),
            "resid_post": lambda: (self.layer(layer), "post"),
            "attn_out": lambda: (self.module(layer, s.attn), "post"),
            "ffn_in": lambda: (self.module(layer, s.mlp), "pre"),
            "coef": lambda: (self.module(layer, s.value), "pre"),
            "ffn_out": lambda: (self.module(layer, s.value), "post"),
            "ffn_write": lambda: (self.module(layer, s.write_site), "post"),
        }
        if site not in table:
            raise FfkvError(f"unknown site '{site}'", f"use one of {', '.join(table)}")
        return table[site]()

    # ----------------------------------------------------------------------------- keys and values
    def _weight(self, layer: int, path: str) -> torch.Tensor:
        """A projection's weight as (out_features, in_features), a view (no copy) of the parameter."""
        w = self.module(layer, path).weight
        return w.T if self.spec.conv1d else w

    def keys(self, layer: int) -> torch.Tensor:
        """Keys of a layer, (d_ffn, d_model): W_in, or W_gate for gated FFNs."""
        w = self._weight(layer, self.spec.key)
        return w[: w.shape[0] // 2] if self.spec.fused_gate_up else w

    def key_bias(self, layer: int) -> torch.Tensor | None:
        b = getattr(self.module(layer, self.spec.key), "bias", None)
        if b is not None and self.spec.fused_gate_up:
            b = b[: b.shape[0] // 2]
        return b

    def up_keys(self, layer: int) -> torch.Tensor | None:
        """W_up, (d_ffn, d_model), for gated FFNs; None otherwise."""
        if self.spec.fused_gate_up:
            w = self._weight(layer, self.spec.key)
            return w[w.shape[0] // 2:]
        if self.spec.up is None:
            return None
        return self._weight(layer, self.spec.up)

    def up_bias(self, layer: int) -> torch.Tensor | None:
        if self.spec.fused_gate_up:
            b = getattr(self.module(layer, self.spec.key), "bias", None)
            return None if b is None else b[b.shape[0] // 2:]
        if self.spec.up is None:
            return None
        return getattr(self.module(layer, self.spec.up), "bias", None)

    def values(self, layer: int) -> torch.Tensor:
        """Values of a layer, (d_model, d_ffn): column i is v_i. A view: in-place writes edit the model."""
        return self._weight(layer, self.spec.value)

    def value_param(self, layer: int) -> nn.Parameter:
        """The ``W_out`` parameter itself (for editing); its layout is ``values(l).T`` if conv1d."""
        return self.module(layer, self.spec.value).weight

    def value_bias(self, layer: int) -> torch.Tensor | None:
        return getattr(self.module(layer, self.spec.value), "bias", None)

    def activation(self, layer: int):
        """The activation applied to ``W_in x`` (``W_gate x``): the family's module, or ``ACT2FN[act_fn]``."""
        if self.spec.act is None:
            return ACT2FN[self.spec.act_fn]
        return self.module(layer, self.spec.act)

    def coefficients_from_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """m(x) computed from the FFN input with the spec's weights.

        ``m = act(W_in x + b_in)`` or, gated, ``m = act(W_gate x + b_g) * (W_up x + b_u)``.
        x: (..., d_model) -> (..., d_ffn)
        """
        pre = torch.nn.functional.linear(x, self.keys(layer), self.key_bias(layer))
        m = self.activation(layer)(pre)
        if self.gated:
            m = m * torch.nn.functional.linear(x, self.up_keys(layer), self.up_bias(layer))
        return m

    def ffn_output_from_coefficients(self, layer: int, m: torch.Tensor) -> torch.Tensor:
        """``FFN = W_out m + b = sum_i m_i v_i + b``. m: (..., d_ffn) -> (..., d_model)"""
        return torch.nn.functional.linear(m, self.values(layer), self.value_bias(layer))

    # ----------------------------------------------------------------------------- logit lens
    def unembed(self, x: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """The family's real head on residual-space vectors: its logits for ``x``.

            logits = cap(scale · E · proj(final_norm(x)))

        with the final norm (skipped when ``norm=False``: the raw logit lens ``E x``), the final projection
        (OPT-350m), the unembedding ``E`` (bias included), the family's logit scaling (Cohere's
        ``logit_scale``, Granite's ``1 / logits_scaling``) and final soft-capping
        ``c · tanh(logits / c)`` (Gemma-2/3's ``final_logit_softcapping``). So the head of the last
        residual equals the model's own logits (checked on load). x: (..., d_model) -> (..., vocab).
        Values are projected with ``self.unembed(values(l).T)``.
        """
        x = x.to(self.dtype)
        if norm and self.final_norm is not None:
            x = self.final_norm(x)
        proj = get_path(self.hf, self.spec.final_proj)
        if proj is not None:
            x = proj(x)
        return self.scale_logits(self.unembedding(x))

    @property
    def logit_scale(self) -> float:
        """The family's linear logit factor: Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, else 1."""
        cfg, s = self.text_config, self.spec
        k = 1.0
        if s.logit_scale is not None:
            k *= float(getattr(cfg, s.logit_scale))
        if s.logit_divisor is not None:
            k /= float(getattr(cfg, s.logit_divisor))
        return k

    @property
    def logit_softcap(self) -> float | None:
        """Final soft-capping ``c`` of ``c tanh(z / c)`` (Gemma-2/3's ``final_logit_softcapping``), or None."""
        s = self.spec
        cap = getattr(self.text_config, s.softcap, None) if s.softcap is not None else None
        return float(cap) if cap else None

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's logit scaling and final soft-capping on ``E x`` (identity for most families), in the
        family's own operations (a division stays a division, so the head matches the model's logits bit for bit)."""
        cfg, s = self.text_config, self.spec
        if s.logit_scale is not None:
            logits = logits * getattr(cfg, s.logit_scale)
        if s.logit_divisor is not None:
            logits = logits / getattr(cfg, s.logit_divisor)
        cap = self.logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ----------------------------------------------------------------------------- text
    def require_tokenizer(self):
        """The tokenizer, or one FfkvError saying how to give the model one."""
        return self._require_tokenizer()

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise FfkvError(f"model '{self.name_or_path}' has no tokenizer",
                            "save one in the model folder or pass tokenizer=... to ffkv.load_model")
        return self.tokenizer

    def encode(self, texts: str | Sequence[str], padding_side: str = "right") -> dict:
        """Tokenize to a padded batch on the model's device: ``input_ids``, ``attention_mask`` (B, T)."""
        tok = self._require_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise FfkvError(f"prompt {t!r} is empty", "give a non-empty prompt")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        old = tok.padding_side
        tok.padding_side = padding_side
        try:
            enc = tok(list(texts), return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old
        self.check_length(int(enc["attention_mask"].sum(1).max()) if len(texts) else 0)
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def check_length(self, n_tokens: int, what: str = "the prompt") -> None:
        """Refuse a sequence longer than :attr:`context_length`, in one line, before the model sees it."""
        if n_tokens > self.context_length:
            raise FfkvError(f"{what} is {n_tokens} tokens long, longer than the model's context "
                            f"({self.context_length} tokens)", f"shorten it to at most {self.context_length} tokens")

    def token_ids(self, text: str) -> list[int]:
        return self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]

    def answer_tokens(self, answer: str, leading_space: bool = True) -> list[int]:
        """Token ids of an answer as a continuation of a prompt: **the one answer rule of ffkv**.

        An answer follows a prompt that ends in a word ("... is located in" -> " Paris"), so ffkv adds one
        leading space unless the answer already starts with whitespace (``leading_space=False`` keeps it
        as given). A tokenizer that encodes that space as a token of its own (SentencePiece's lone "▁") has
        it dropped. Every command and API entry point (``trace``, ``neurons``, ``recall``, ``edit``,
        ``evaluate``) uses this rule, so ``--answer Paris`` and ``--answer " Paris"`` name the same token.
        """
        if not isinstance(answer, str) or not answer.strip():
            raise FfkvError(f"answer {answer!r} is empty", "give a non-empty answer, e.g. --answer Paris")
        text = answer if (not leading_space or answer[:1].isspace()) else " " + answer
        ids = self.token_ids(text)
        if len(ids) > 1 and not self.decode([ids[0]]).strip():
            ids = ids[1:]
        if not ids:
            raise FfkvError(f"answer {answer!r} tokenizes to nothing", "give a non-empty answer")
        return ids

    def answer_id(self, answer: str, leading_space: bool = True) -> int:
        """The first token of an answer under :meth:`answer_tokens`' rule (``"Paris"`` == ``" Paris"``)."""
        return self.answer_tokens(answer, leading_space)[0]

    def decode(self, ids) -> str:
        return self._require_tokenizer().decode(ids)

    def __call__(self, *args, **kwargs):
        return self.hf(*args, **kwargs)

    @torch.no_grad()
    def next_token_logits(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Logits of the token after each text, (B, vocab), read at each row's last real token."""
        batch = self.encode(texts)
        logits = self.hf(**batch).logits
        last = batch["attention_mask"].sum(1) - 1
        return logits[torch.arange(logits.shape[0], device=logits.device), last]

    def next_token_probs(self, texts: str | Sequence[str]) -> torch.Tensor:
        return torch.softmax(self.next_token_logits(texts).float(), dim=-1)

    def find_subject(self, prompt: str, subject: str) -> tuple[int, int]:
        """Token span ``[start, end)`` of ``subject`` inside ``prompt`` (ROME's subject positions).

        Uses character offsets, so it works for any tokenizer that reports them; a subject that is not
        in the prompt is an error naming both.
        """
        if not subject or subject not in prompt:
            raise FfkvError(f"subject {subject!r} does not occur in prompt {prompt!r}",
                            "pass the subject exactly as it is written in the prompt")
        tok = self._require_tokenizer()
        char_start = prompt.index(subject)
        char_end = char_start + len(subject)
        enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=True)
        span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > char_start and a < char_end and b > a]
        if not span:
            raise FfkvError(f"subject {subject!r} maps to no token of {prompt!r}", "check the tokenizer")
        return span[0], span[-1] + 1


def weights_fingerprint(hf_model: torch.nn.Module, sample: int = 64) -> str:
    """A cheap identity of a model's weights: names, shapes and a strided sample of each tensor.

    Not a full checksum (that would read 100+ GB for a 70B model); the edit journal hashes the matrices
    it changes in full.
    """
    h = hashlib.sha256()
    for name, p in hf_model.state_dict().items():
        if p.device.type == "meta":
            h.update(f"{name}{tuple(p.shape)}meta".encode())
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat[::step][:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
