"""--device-map (accelerate): a model placed by a device map runs, reads and edits like one on a single device.

This machine has one device kind (CPU), so the maps here place modules on ``cpu`` (``auto`` and an explicit
per-module map); offloading to ``disk`` is refused in one line. On a machine with several GPUs the same code
places layers on ``cuda:N`` (docs/foundation.md, "Models larger than one device").
"""

import pytest
import torch

from ffkv import load_model
from ffkv.edit.api import apply_edits
from ffkv.edit.requests import EditRequest
from ffkv.errors import FfkvError
from ffkv.models.engine import run

pytest.importorskip("accelerate")

PROMPT = "The native language of Quoux Kurte is"


def _module_map(mm, where_late: str) -> dict:
    L = mm.n_layers
    m = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    m.update({f"transformer.h.{i}": ("cpu" if i < L // 2 else where_late) for i in range(L)})
    return m


@pytest.mark.parametrize("device_map", ["auto", "explicit"])
def test_a_mapped_model_equals_the_plain_one_and_edits_undo_exactly(default_testbed, testbed_model, device_map,
                                                                    tmp_path):
    folder = default_testbed / "model"
    dm = _module_map(testbed_model, "cpu") if device_map == "explicit" else "auto"
    mm = load_model(folder, device_map=dm)
    ids = mm.encode(PROMPT)["input_ids"]
    a = run(mm, ids, reads=[("coef", 3)], head="last")
    b = run(testbed_model, ids, reads=[("coef", 3)], head="last")
    assert torch.equal(a.logits, b.logits) and torch.equal(a.rec["coef", 3], b.rec["coef", 3])
    if device_map == "auto":
        return
    before = mm.values(1).clone()
    j = apply_edits(mm, [EditRequest("The native language of {} is", "Quoux Kurte", " French")], "rome",
                    hparams={"layers": [1]}, stats_dir=tmp_path, corpus=["Quoux Kurte grew up speaking Dutch."] * 8,
                    progress=False)
    assert not torch.equal(mm.values(1), before) and mm.values(1).device == before.device
    j.undo(mm)
    assert torch.equal(mm.values(1), before)


def test_offloading_is_refused_in_one_line(default_testbed, testbed_model, tmp_path):
    with pytest.raises(FfkvError, match="offloads"):
        load_model(default_testbed / "model", device_map=_module_map(testbed_model, "disk"))
