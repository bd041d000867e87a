"""Load any supported Hugging Face causal LM as a :class:`MemoryModel`.

``load_model("gpt2")``, ``load_model("/path/to/folder")``, ``load_model(..., dtype="bfloat16",
device="cuda", device_map="auto")``. Weights come from safetensors when the folder has them;
``trust_remote_code`` stays off unless asked. Missing models and unsupported architectures are one
clear :class:`~ffkv.errors.FfkvError`, checked before any weight is read.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub import constants

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import FfkvError
from .adapters import get_spec
from .check import check_adapter
from .infer import MixtureOfExpertsRefusal, Refusal, meta_model
from .model import MemoryModel, weights_fingerprint
from .moe import MoEModel, is_moe
from .moe_infer import infer_moe_spec, moe_from_hf
from .tiny import tiny_config

__all__ = ["load_model", "load_config", "from_hf", "tiny_model", "weights_fingerprint", "config_from_json",
           "SHIPPED_CONFIGS", "DTYPES"]

CONFIG_DIR = Path(__file__).parent / "configs"

# Published configs shipped with ffkv, so that census/inspect work offline on large models.
SHIPPED_CONFIGS = {
    "gpt2-xl": "gpt2-xl.json",
    "openai-community/gpt2-xl": "gpt2-xl.json",
    "gpt-j-6b": "gpt-j-6b.json",
    "EleutherAI/gpt-j-6b": "gpt-j-6b.json",
    "llama-2-7b": "llama-2-7b.json",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b.json",
    "llama-3-8b": "llama-3-8b.json",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b.json",
    "mistral-7b": "mistral-7b.json",
    "mistralai/Mistral-7B-v0.1": "mistral-7b.json",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "auto": "auto"}


def _not_found(name: str, why: str = "") -> FfkvError:
    return FfkvError(
        f"model '{name}' was not found: it is not a local folder and could not be fetched from the hub"
        + (f" ({why})" if why else ""),
        "pass the path of a local model folder (config.json + weights), or a hub name when online",
    )


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """A transformers config from a shipped name, a model folder, a config.json, or the hub."""
    name = str(name_or_path)
    if name in SHIPPED_CONFIGS:
        return config_from_json(CONFIG_DIR / SHIPPED_CONFIGS[name])
    p = Path(name)
    if p.is_file() and p.suffix == ".json":
        return config_from_json(p)
    if p.is_dir() and not (p / "config.json").exists():
        raise FfkvError(f"folder '{name}' has no config.json", "point to a Hugging Face model folder")
    if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise _not_found(name, "no such path")
    if not p.exists():
        _offline_if_hub_unreachable()
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in msg:
            raise FfkvError(f"model '{name}' needs custom code from its repository",
                            "pass trust_remote_code=True (--trust-remote-code) if you trust it") from None
        if "does not recognize this architecture" in msg or "model_type" in msg:
            raise FfkvError(f"model '{name}' has an architecture transformers does not know ({msg})",
                            "upgrade transformers or use a supported model") from None
        raise _not_found(name, msg[:160]) from None


_HUB_CHECKED = False


def _offline_if_hub_unreachable(timeout: float = 3.0) -> None:
    """Switch huggingface_hub to its local cache when the hub cannot be reached.

    Without this, a hub name on a machine with no network spends ~25 s in retries before failing.
    """
    global _HUB_CHECKED
    if _HUB_CHECKED:
        return
    _HUB_CHECKED = True
    if constants.HF_HUB_OFFLINE:
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True
        sys.modules[huggingface_hub.is_offline_mode.__module__].HF_HUB_OFFLINE = True


def config_from_json(path: Path):
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FfkvError(f"config file {path} cannot be read ({e})", "pass a valid config.json") from None
    mt = d.pop("model_type", None)
    if mt is None:
        raise FfkvError(f"config file {path} has no model_type", "add \"model_type\" to it")
    try:
        return AutoConfig.for_model(mt, **d)
    except ValueError as e:
        raise FfkvError(f"config file {path} has model_type '{mt}', which transformers does not know "
                        f"({(str(e).splitlines() or [''])[0][:120]})", "upgrade transformers or fix the config") \
            from None


def load_model(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | None = None,
               device_map: str | dict | None = None, trust_remote_code: bool = False,
               tokenizer: bool | str = True, check: bool = True) -> MemoryModel:
    """Load a causal LM by hub name or local path and wrap it as a :class:`MemoryModel`.

    dtype: "float32" (default on CPU), "bfloat16", "float16" or "auto". device: "cpu", "cuda", ...;
    device_map (e.g. "auto") is passed to ``from_pretrained`` for models larger than one device.
    tokenizer: load the folder's tokenizer (True), none (False), or one from another path. A folder
    without a tokenizer loads with ``tokenizer=None``. The adapter check runs unless ``check=False``.
    Model types without a hand-written spec get one inferred from their module structure (on a
    ``meta``-device build, before any weight is read); what cannot be read is refused in one line.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FfkvError(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    name = str(name_or_path)
    config = load_config(name, trust_remote_code=trust_remote_code)
    if not is_moe(config):  # mixture-of-experts families have their specs and check in models/moe.py
        try:
            get_spec(config, trust_remote_code=trust_remote_code)  # refuse before reading weights
        except MixtureOfExpertsRefusal:  # an MoE spec inferred from the module structure (moe_infer)
            infer_moe_spec(meta_model(config, trust_remote_code))
    if name in SHIPPED_CONFIGS:
        raise FfkvError(f"'{name}' is a shipped config without weights",
                        "use it with `ffkv census`, or pass the model's folder or hub name")
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": _has_safetensors(name)}
    kwargs["dtype"] = dtype or torch.float32
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        hf = AutoModelForCausalLM.from_pretrained(name, config=config, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_found(name, (str(e).splitlines() or [""])[0][:160]) from None
    if device_map is None and device is not None:
        hf = hf.to(device)
    tok = _load_tokenizer(tokenizer if isinstance(tokenizer, str) else name, trust_remote_code) \
        if tokenizer else None
    return from_hf(hf, tok, name, check)


def from_hf(hf_model: torch.nn.Module, tokenizer=None, name_or_path: str | None = None,
            check: bool = True) -> MemoryModel:
    """Wrap a built transformers causal LM as a :class:`MemoryModel` and run the adapter check.

    A hand-written spec that fails the check raises :class:`~ffkv.errors.AdapterCheckFailed`; an
    inferred one is refused (:class:`~ffkv.models.infer.Refusal`, reason "check-failed") with the
    check's first mismatch ("check failed at layer L: ...").
    """
    if is_moe(hf_model.config):
        return MoEModel.from_hf_checked(hf_model, tokenizer, name_or_path, check)
    try:
        mm = MemoryModel(hf_model, tokenizer, name_or_path=name_or_path)
    except MixtureOfExpertsRefusal:  # an MoE spec inferred from the module structure (moe_infer)
        return moe_from_hf(hf_model, tokenizer, name_or_path, check)
    if not check:
        return mm
    if not mm.spec.inferred:
        mm.adapter_check = check_adapter(mm, raise_on_fail=True)
        return mm
    mt = hf_model.config.model_type
    try:
        result = check_adapter(mm, raise_on_fail=False)
    except FfkvError:
        raise
    except Exception as e:  # an inferred spec on a model that does not run on plain input_ids
        text = (str(e).strip().splitlines() or [""])[0][:140]
        raise Refusal(mt, "check-failed", f"check failed: the model does not run on plain token ids "
                      f"({type(e).__name__}: {text})") from None
    if not result["passed"]:
        raise Refusal(mt, "check-failed", f"check failed at {result['failure']}")
    mm.adapter_check = result
    return mm


def _has_safetensors(name: str) -> bool | None:
    p = Path(name)
    if p.is_dir():
        has = any(p.glob("*.safetensors"))
        if not has and not any(p.glob("*.bin")):
            raise FfkvError(f"folder '{name}' has a config but no weights", "save the model with save_pretrained")
        # A folder with only pickle weights is read through torch.load(weights_only=True) by transformers.
        return True if has else False
    return None  # hub: transformers prefers safetensors when the repo has them


def _load_tokenizer(name: str, trust_remote_code: bool):
    p = Path(name)
    if p.is_dir() and not any((p / f).exists() for f in
                              ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


def tiny_model(model_type: str, n_layers: int = 2, d_model: int = 32, d_ffn: int = 64, vocab: int = 128,
               seed: int = 0, dtype: torch.dtype = torch.float32, check: bool = True,
               tokenizer=None) -> MemoryModel:
    """A randomly initialised tiny model of any causal-LM model type, built from a config (no download).

    ``tokenizer`` (optional) is attached as the model's tokenizer; give ``vocab=len(tokenizer)``.

    ``tiny_model("gemma2")``, ``tiny_model("olmo2")``, ``tiny_model("qwen3")``: sizes as given; model types
    without a hand-written test config are shrunk from their default config (:func:`ffkv.models.tiny
    .shrink_config`). Refusals are one-line :class:`~ffkv.errors.FfkvError`\ s, as for :func:`load_model`.
    """
    config = tiny_config(model_type, n_layers, d_model, d_ffn, vocab)
    torch.manual_seed(seed)
    try:
        hf = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # transformers' own validation of a shrunk config: one line, never a traceback
        text = (str(e).strip().splitlines() or [""])[0][:140]
        raise Refusal(model_type, "cannot-build", f"transformers cannot build it tiny ({type(e).__name__}: "
                      f"{text})", "this model type is checked at full size only") from None
    hf = hf.to(dtype)
    return from_hf(hf, tokenizer, f"tiny-{model_type}", check)

