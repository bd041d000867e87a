"""Shared fixtures. Capability tests add their own fixtures in their own files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FFKV_SHARED_DATA", REPO.parent / "shared" / "data"))


def hook_count(model) -> int:
    """Every hook on a MemoryModel's network (global, forward, pre-forward, backward): what a run must leave as
    it found it. Test modules import it (``from conftest import hook_count``)."""
    n = len(torch.nn.modules.module._global_forward_hooks) + len(torch.nn.modules.module._global_forward_pre_hooks)
    for mod in model.hf.modules():
        n += len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks) \
            + len(mod._backward_pre_hooks)
    return n


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: its tests compare timings or are sensitive to a busy second core."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that use it skip with a reason on a clone without it."""
    if not SHARED_DATA.exists():
        pytest.skip(f"public data sets not found at {SHARED_DATA} (set FFKV_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def planted():
    """A 2-layer GPT-2 with planted memories (see ffkv.testbed.planted.DEFAULT_FACTS)."""
    from ffkv.testbed.planted import planted_model

    return planted_model(arch="gpt2")


@pytest.fixture(scope="session")
def planted_llama():
    from ffkv.testbed.planted import planted_model

    return planted_model(arch="llama")


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny random model of every supported family, keyed by model_type."""
    from ffkv.models.adapters import supported_model_types
    from ffkv.models.loading import tiny_model

    return {mt: tiny_model(mt) for mt in supported_model_types()}


@pytest.fixture(scope="session")
def default_testbed() -> Path:
    """The shipped default testbed folder (model/ + data/)."""
    from ffkv.testbed import default_testbed as _default

    return Path(_default())


@pytest.fixture(scope="session")
def testbed_model(default_testbed):
    import ffkv

    return ffkv.load_model(default_testbed / "model")
