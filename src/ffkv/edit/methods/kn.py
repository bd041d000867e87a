"""Knowledge-neuron edits (Dai et al., 2022): move the values of a fact's knowledge neurons.

The neurons and the update are :mod:`ffkv.edit.kn_edit`'s (integrated gradients from ffkv.locate).
"""

from __future__ import annotations

from ..kn_edit import kn_edit

NAME = "kn"
SUMMARY = "move the values of the fact's knowledge neurons from the old object to the new (Dai et al., 2022)"
BATCHED = False
HPARAM_DOCS = {
    "neurons": "[[layer, index], ...] the neurons to move (default: found by integrated gradients)",
    "layers": "layers searched for knowledge neurons (default: all)",
    "ig_steps": "integrated-gradient steps",
    "threshold": "a neuron's attribution must exceed threshold * the largest attribution",
    "max_neurons": "at most this many neurons per request",
    "kn_lambda": "how far each value moves: v_i += kn_lambda * (e_new - e_old)",
    "seed": "random seed",
    "max_update_ratio": "refuse an update with ||dW||_F > max_update_ratio * ||W||_F",
}


def defaults(model) -> dict:
    return {"neurons": None, "layers": None, "ig_steps": 10, "threshold": 0.2, "max_neurons": 8,
            "kn_lambda": 1.0, "seed": 0, "max_update_ratio": 100.0}


def layers(hp: dict) -> list[int]:
    if hp.get("neurons"):
        return sorted({int(n[0]) for n in hp["neurons"]})
    return list(hp["layers"]) if hp.get("layers") is not None else []


def apply(model, requests, hp: dict, journal, context) -> None:
    for r in requests:
        kn_edit(model, r, hp, journal)
