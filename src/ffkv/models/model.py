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
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import FfkvError
from .adapters import ArchSpec, get_path, get_spec


class MemoryModel:
    """The key-value view of one causal LM. Build it with :func:`ffkv.load_model` or :meth:`from_hf`."""

    def __init__(self, hf_model: nn.Module, tokenizer=None, spec: ArchSpec | None = None,
                 name_or_path: str | None = None):
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.config = hf_model.config
        self.spec = spec or get_spec(self.config)
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

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, check: bool = True) -> "MemoryModel":
        """Wrap an already-built transformers model; runs the adapter check unless ``check=False``."""
        return cls.from_hf_checked(hf_model, tokenizer, None, check)

    @classmethod
    def from_hf_checked(cls, hf_model, tokenizer, name_or_path, check: bool) -> "MemoryModel":
        mm = cls(hf_model, tokenizer, name_or_path=name_or_path)
        mm.adapter_check = None
        if check:
            from .check import check_adapter

            mm.adapter_check = check_adapter(mm, raise_on_fail=True)
        return mm

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
    def identity(self) -> dict:
        """Who this model is, for result files: name, type, shapes and a fingerprint of its weights."""
        from .loading import weights_fingerprint

        return {
            "name_or_path": str(self.name_or_path),
            "model_type": self.config.model_type,
            "family": self.family,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_ffn": self.d_ffn,
            "vocab_size": self.vocab_size,
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

    def site_module(self, site: str, layer: int | None) -> tuple[nn.Module, str]:
        """``(module, kind)`` where a hook site lives: kind "pre" reads/rewrites the module's first input,
        "post" its first output. See :data:`ffkv.models.hooks.SITES` for the sites."""
        s = self.spec
        table = {
            "embed": lambda: (self.embedding, "post"),
            "resid_pre": lambda: (self.layer(layer), "pre"),
            "resid_post": lambda: (self.layer(layer), "post"),
            "attn_out": lambda: (self.module(layer, s.attn), "post"),
            "ffn_in": lambda: (self.module(layer, s.mlp), "pre"),
            "coef": lambda: (self.module(layer, s.value), "pre"),
            "ffn_out": lambda: (self.module(layer, s.value), "post"),
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
        """Vocabulary logits of residual-space vectors: ``E · final_norm(x)`` (or ``E · x``, norm=False).

        x: (..., d_model) -> (..., vocab). Values are projected with ``self.unembed(values(l).T)``.
        """
        x = x.to(self.dtype)
        if norm and self.final_norm is not None:
            x = self.final_norm(x)
        proj = get_path(self.hf, self.spec.final_proj)
        if proj is not None:
            x = proj(x)
        return self.unembedding(x)

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
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        old = tok.padding_side
        tok.padding_side = padding_side
        try:
            enc = tok(list(texts), return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

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
