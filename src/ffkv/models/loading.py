"""Load any supported Hugging Face causal LM as a :class:`MemoryModel`.

``load_model("gpt2")``, ``load_model("/path/to/folder")``, ``load_model(..., dtype="bfloat16",
device="cuda", device_map="auto")``. Weights come from safetensors when the folder has them;
``trust_remote_code`` stays off unless asked. Missing models, unsupported architectures, a damaged
config.json or checkpoint (:mod:`ffkv.models.integrity`) and bad load arguments are one clear
:class:`~ffkv.errors.FfkvError`, checked before any weight is read; NaN and inf weights are refused after
loading unless ``allow_nonfinite=True``.
"""

from __future__ import annotations

import json
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub import constants

from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter
from transformers.initialization import no_init_weights
from transformers.utils import logging as hf_logging

from ..errors import FfkvError
from .adapters import get_spec
from .check import check_adapter
from .infer import MixtureOfExpertsRefusal, Refusal, meta_model
from .integrity import (Checkpoint, check_checkpoint, check_device, check_device_map, check_loading_info,
                        check_shapes, nonfinite_error, nonfinite_weights, pickle_refusal, read_config_json)
from .model import MemoryModel, weights_fingerprint
from .moe import MoEModel, is_moe
from .moe_infer import infer_moe_spec, moe_from_hf
from .tiny import tiny_config

__all__ = ["load_model", "load_checked", "load_config", "from_hf", "tiny_model", "weights_fingerprint", "config_from_json",
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
    """A transformers config from a shipped name, a model folder, a config.json, or the hub.

    A local folder's config.json is read and checked first (:func:`ffkv.models.integrity.read_config_json`),
    so a corrupt file, an unknown ``model_type`` or a config that needs the folder's own code is refused in
    one line naming that problem.
    """
    name = str(name_or_path)
    if name in SHIPPED_CONFIGS:
        return config_from_json(CONFIG_DIR / SHIPPED_CONFIGS[name])
    p = Path(name)
    if p.is_file() and p.suffix == ".json":
        return config_from_json(p)
    if p.is_file():
        raise FfkvError(f"'{name}' is a file, not a model folder", "pass the folder that holds config.json and the "
                        "weights")
    if p.is_dir() and not (p / "config.json").exists():
        raise FfkvError(f"folder '{name}' has no config.json", "point to a Hugging Face model folder")
    if p.is_dir():
        raw = read_config_json(p, trust_remote_code, CONFIG_MAPPING)
        try:
            return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except Exception as e:  # transformers' own validation of the config: one line, never a traceback
            raise _config_error(name, raw, e) from None
    if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise _not_found(name, "no such path")
    if not p.exists():
        _offline_if_hub_unreachable()
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            raise FfkvError(f"model '{name}' needs custom code from its repository",
                            "pass trust_remote_code=True (--trust-remote-code) if you trust it") from None
        if "does not recognize this architecture" in msg or "model_type" in msg:
            raise FfkvError(f"model '{name}' has an architecture transformers does not know ({msg})",
                            "upgrade transformers or use a supported model") from None
        raise _not_found(name, msg[:160]) from None


def _config_error(name: str, raw: dict, e: Exception) -> FfkvError:
    text = str(e)
    first = (text.strip().splitlines() or [type(e).__name__])[0][:160]
    if "trust_remote_code" in text:
        return FfkvError(f"model '{name}' needs custom code from its folder",
                         "pass --trust-remote-code (trust_remote_code=True) if you trust that code")
    if "model_type" not in raw:
        return FfkvError(f"{Path(name) / 'config.json'} has no model_type", "add \"model_type\" to it")
    return FfkvError(f"{Path(name) / 'config.json'} is not a valid '{raw['model_type']}' config "
                     f"({type(e).__name__}: {first})", "restore config.json from the model's source")


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FfkvError(f"config file {path} cannot be read ({e})", "pass a valid config.json") from None
    if not isinstance(d, dict):
        raise FfkvError(f"config file {path} is not a JSON object", "pass a valid config.json")
    mt = d.pop("model_type", None)
    if mt is None:
        raise FfkvError(f"config file {path} has no model_type", "add \"model_type\" to it")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise FfkvError(f"config file {path} has model_type {mt!r}, which the installed transformers does not know",
                        "upgrade transformers or fix the config")
    try:
        return AutoConfig.for_model(mt, **d)
    except Exception as e:  # the config class's own validation: one line, never a traceback
        raise FfkvError(f"config file {path} is not a valid '{mt}' config ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]})", "fix the config") from None


def load_model(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | None = None,
               device_map: str | dict | None = None, trust_remote_code: bool = False,
               tokenizer: bool | str = True, check: bool = True, allow_nonfinite: bool = False) -> MemoryModel:
    """Load a causal LM by hub name or local path and wrap it as a :class:`MemoryModel`.

    dtype: "float32" (default on CPU), "bfloat16", "float16" or "auto". device: "cpu", "cuda", ...;
    device_map (e.g. "auto") is passed to ``from_pretrained`` for models larger than one device.
    tokenizer: load the folder's tokenizer (True), none (False), or one from another path. A folder
    without a tokenizer loads with ``tokenizer=None``. The adapter check runs unless ``check=False``.
    Model types without a hand-written spec get one inferred from their module structure (on a
    ``meta``-device build, before any weight is read); what cannot be read is refused in one line.

    A local folder's files are checked before any weight is read (:mod:`ffkv.models.integrity`: config.json,
    safetensors headers and byte ranges, shard index, tensor shapes against the config), and the loaded
    weights for NaN and inf: a model with non-finite weights is refused unless ``allow_nonfinite=True``
    (then the adapter check, whose comparison would be NaN, is not run). Every problem is one
    :class:`~ffkv.errors.FfkvError`.
    """
    return load_checked(name_or_path, dtype, device, device_map, trust_remote_code, tokenizer, check,
                        allow_nonfinite)[0]


def load_checked(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                 device_map: str | dict | None = None, trust_remote_code: bool = False,
                 tokenizer: bool | str = True, check: bool = True,
                 allow_nonfinite: bool = False) -> tuple[MemoryModel, list[dict]]:
    """:func:`load_model`, also returning the non-finite weights found
    (:func:`ffkv.models.integrity.nonfinite_weights`; empty unless ``allow_nonfinite=True`` let them through)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FfkvError(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    check_device(device)
    device_map = check_device_map(device_map)
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
    ckpt = _checked_checkpoint(name, config, trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code, "output_loading_info": True,
              "use_safetensors": None if ckpt is None else ckpt.format == "safetensors"}
    kwargs["dtype"] = dtype or torch.float32
    if device_map is not None:
        kwargs["device_map"] = device_map
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ffkv shows its own progress; transformers' per-load bar is noise here
    try:
        with warnings.catch_warnings():
            # torch's weights_only unpickler warns, on stderr, about the pickle protocol of files it then reads
            # or refuses; the outcome is what ffkv reports.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            hf, info = AutoModelForCausalLM.from_pretrained(name, config=config, **kwargs)
    except FfkvError:
        raise
    except Exception as e:  # whatever the checks above could not see: one line naming it, never a traceback
        raise _load_error(name, ckpt, e) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    check_loading_info(info, name)
    if device_map is not None:
        _refuse_offload(hf, name)
    if device_map is None and device is not None:
        try:
            hf = hf.to(device)
        except torch.OutOfMemoryError:
            raise FfkvError(f"model '{name}' does not fit in the memory of {device}",
                            "use a smaller --dtype (bfloat16), --device-map auto, or another device") from None
    report = nonfinite_weights(hf)
    if report and not allow_nonfinite:
        raise nonfinite_error(name, report, dtype if isinstance(dtype, torch.dtype) else None)
    tok = _load_tokenizer(tokenizer if isinstance(tokenizer, str) else name, trust_remote_code,
                          explicit=isinstance(tokenizer, str)) if tokenizer else None
    return from_hf(hf, tok, name, check and not report), report


def _refuse_offload(hf, name: str) -> None:
    """A device map may place modules on any devices, but not offload them (to ``disk``/``cpu`` offload, which
    leaves ``meta`` tensors in the model): ffkv reads keys and values and writes edits in the weights themselves,
    and an offloaded weight is not there to read or write."""
    off = sorted({n.rsplit(".", 1)[0] for n, p in hf.named_parameters() if p.device.type == "meta"})
    if off:
        raise FfkvError(f"the device map offloads {len(off)} modules of '{name}' (e.g. {off[0]}), whose weights "
                        "ffkv cannot read or edit in place",
                        "map every module to a device (cpu, cuda:N), or give the devices more memory (max_memory)")


def _checked_checkpoint(name: str, config, trust_remote_code: bool) -> Checkpoint | None:
    """A local folder's checkpoint, its files and shapes checked (None for a hub name: its files are not here
    until transformers downloads them, and transformers' own errors are turned into one line)."""
    p = Path(name)
    if not p.is_dir():
        return None
    ckpt = check_checkpoint(p)
    # Quantized checkpoints store packed tensors whose shapes are not the model's.
    if ckpt.tensors and getattr(config, "quantization_config", None) is None:
        try:  # shapes only: skipping the (meta-device) weight init makes the build several times faster
            with torch.device("meta"), no_init_weights():
                meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except Exception:  # transformers cannot build it: from_pretrained will say why, in one line
            meta = None
        # A model whose loading converts tensors (v5 fuses MoE experts) stores other shapes under some of its
        # names; transformers checks those itself, and its error becomes one line (_load_error).
        if meta is not None and not any(isinstance(t, WeightConverter) for t in get_model_conversion_mapping(meta)):
            check_shapes(ckpt, meta, name)
    return ckpt


def _load_error(name: str, ckpt: Checkpoint | None, e: Exception) -> FfkvError:
    text = str(e)
    first = (text.strip().splitlines() or [type(e).__name__])[0][:160]
    if isinstance(e, torch.OutOfMemoryError):
        return FfkvError(f"model '{name}' does not fit in memory", "use a smaller --dtype (bfloat16) or "
                         "--device-map auto")
    if "mismatched_sizes" in text or "size mismatch" in text:
        return FfkvError(f"the weights in '{name}' do not match its config.json ({first})",
                         "use the config.json saved with these weights")
    if ckpt is not None and ckpt.format == "pickle":
        return pickle_refusal(name, e)
    if ckpt is None and isinstance(e, (OSError, ValueError)):
        return _not_found(name, first)
    return FfkvError(f"model '{name}' cannot be loaded ({type(e).__name__}: {first})",
                     "check the model's files, or save the model again")


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


def _load_tokenizer(name: str, trust_remote_code: bool, explicit: bool = False):
    """The tokenizer of a model folder (None when it has no tokenizer files, or a hub repository none).

    A local folder whose tokenizer files do not load, or a tokenizer path given explicitly, is refused in one
    line: silently loading without it would surface later as "the model has no tokenizer", the wrong problem.
    """
    p = Path(name)
    files = [f for f in _TOKENIZER_FILES if (p / f).exists()] if p.is_dir() else []
    if p.is_dir() and not files:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers', tokenizers' or sentencepiece's errors alike
        if not (p.is_dir() or explicit):
            return None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise FfkvError(f"the tokenizer in '{name}' cannot be loaded ({type(e).__name__}: {first})",
                        f"restore its files ({', '.join(files) or 'tokenizer.json'}) from the model's source") \
            from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


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

