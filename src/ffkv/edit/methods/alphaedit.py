"""AlphaEdit (Fang et al., 2025): MEMIT's batch update projected onto the null space of the preserved keys.

MEMIT trades the new pairs against the layer's other outputs through λ C. AlphaEdit removes that trade-off:
the update is confined to the directions the preserved keys K0 (the statistics corpus) do not use, so
ΔW K0 ≈ 0 whatever the edit, and only the keys of the earlier edits K_p are traded against the new ones.

1. Null-space projector of each edited layer, from its statistics C = E[k k^T] = K0 K0^T / N (d_ffn, d_ffn):

       C = U diag(s) U^T,   U0 = the columns of U with s_i < nullspace_threshold,   P = U0 U0^T

   (AlphaEdit's ``get_project``: the eigenvectors of C below an absolute threshold, 2e-2 in every published
   file; ``P`` (d_ffn, d_ffn) is symmetric and idempotent, and ||ΔW K0||² / N = tr(ΔW P C P ΔW^T) < thr ||ΔW||²_F).
2. Targets and residual spreading exactly as MEMIT (:mod:`ffkv.edit.memit`): z_i = h_i^L + δ_i at the last
   edited layer, and at layer l_j the remaining residual R = (Z - H^L) / (m - j) (d_model, n).
3. Per layer, with K (d_ffn, n) the batch's keys and K_p (d_ffn, N_p) the keys of every earlier AlphaEdit
   edit of that layer (AlphaEdit's ``cache_c`` = K_p K_p^T, grown after each batch):

       ΔW = R K^T P (K_p K_p^T P + K K^T P + L2 I)^-1                     (d_model, d_ffn)

   solved as AlphaEdit's code does, v = (P (K K^T + K_p K_p^T) + L2 I)^-1 P K (d_ffn, n), an LU solve in
   float64, and ΔW = R v^T is the journal entry (u = R, v). (P A + L2 I) maps range(I - P) to itself times
   L2, so ΔW (I - P) = 0 exactly: the update lives in the null space.

State. K_p K_p^T is :class:`AlphaEditState`, kept in the :class:`~ffkv.edit.context.EditContext`
(``context.method_state``), never on the model, and always in step with the journal: the keys of each entry
are in the journal (``entry.keys``, saved with it), and the state is the ordered sum of those of the journal's
``alphaedit`` entries of the layer. It is extended by the new entries only; after an undo (or for a journal
loaded in another process) it is summed again from the journal, in the same order, so it has the same bits.

Defaults: AlphaEdit's published files (GPT-2 XL, GPT-J, Llama-3-8B): MEMIT's layers, clamp 0.75, 20 (GPT-2)
or 25 Adam steps at lr 0.5 (Llama-3: 0.1), weight decay 0.5, KL 0.0625, nullspace_threshold 2e-2, L2 10,
and context prefixes [[10, 5]] (``{}`` plus five generated 10-token prefixes). On the testbed the target's
clamp is ffkv's tuned MEMIT value (4, :data:`.common.TESTBED_TUNED`, with the measurements). AlphaEdit's files also carry
``mom2_update_weight``, which its update does not read: pasted in, it is dropped with a warning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ...errors import FfkvError
from ..memit import memit_edit
from .common import VALUE_DEFAULTS, VALUE_DOCS, tuned
from .memit import default_layers

NAME = "alphaedit"
SUMMARY = "MEMIT's batch update projected onto the null space of the preserved keys (Fang et al., 2025)"
BATCHED = True
HPARAM_DOCS = {
    "layers": "the FFN layers whose W_out are rewritten, the residual target is set after the last",
    "clamp_norm_factor": "||delta|| <= clamp_norm_factor * ||h|| after every step",
    "nullspace_threshold": "P projects on the eigenvectors of C = E[k k^T] with eigenvalue below this",
    "L2": "ridge term L2 * I of the projected solve (P (K K^T + K_p K_p^T) + L2 I)",
    **VALUE_DOCS,
}

# (family, n_layers) -> AlphaEdit's published optimisation settings that differ from GPT-2 XL's
FAMILY_TABLE = {("gpt-j", 28): {"v_num_grad_steps": 25}, ("llama", 32): {"v_num_grad_steps": 25, "v_lr": 0.1}}


def defaults(model) -> dict:
    hp = {**copy.deepcopy(VALUE_DEFAULTS), "prefixes": [[10, 5]], "layers": default_layers(model),
          "clamp_norm_factor": 0.75, "nullspace_threshold": 2e-2, "L2": 10.0}
    hp.update(FAMILY_TABLE.get((model.family, model.n_layers), {}))
    hp.update(tuned(model, NAME))
    return hp


def layers(hp: dict) -> list[int]:
    return list(hp["layers"])


# ----------------------------------------------------------------------------------------------------
def null_space_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0^T (d_ffn, d_ffn) float64: U0 the eigenvectors of C (d_ffn, d_ffn) with eigenvalue < threshold."""
    s, U = torch.linalg.eigh(C.double().cpu())
    U0 = U[:, s < threshold]
    return U0 @ U0.T


def projected_update(P: torch.Tensor, cache_c: torch.Tensor, K: torch.Tensor, R: torch.Tensor, L2: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with ΔW = u v^T = R K^T P (K_p K_p^T P + K K^T P + L2 I)^-1 (module docstring, step 3).

    P, cache_c = K_p K_p^T: (d_ffn, d_ffn); K: (d_ffn, n); R: (d_model, n). v = (P (K K^T + cache_c) + L2 I)^-1 P K.
    """
    K = K.double().cpu()
    P = P.double().cpu()
    A = P @ (K @ K.T + cache_c.double().cpu())
    A.diagonal().add_(float(L2))
    return R.double().cpu(), torch.linalg.solve(A, P @ K)


@dataclass
class AlphaEditState:
    """The keys of the earlier AlphaEdit edits of each layer, as AlphaEdit's ``cache_c``.

    cache_c: {layer: K_p K_p^T (d_ffn, d_ffn) float64}; n_keys: {layer: N_p}; counted: {layer: the
    (before, after) checksums of the journal entries summed, in order}. Built from a journal by
    :meth:`sync` (module docstring), so it follows undo, save/load and replay.
    """

    cache_c: dict = field(default_factory=dict)
    n_keys: dict = field(default_factory=dict)
    counted: dict = field(default_factory=dict)

    def sync(self, journal, layer: int, d_ffn: int) -> torch.Tensor:
        """K_p K_p^T of ``layer`` for the journal as it is now; extended by its new entries, or summed again."""
        entries = [e for e in journal.entries if e.method == NAME and e.layer == layer and e.expert is None]
        ids = [(e.before, e.after) for e in entries]
        done = self.counted.get(layer, [])
        if layer not in self.cache_c or ids[: len(done)] != done:
            self.cache_c[layer] = torch.zeros(d_ffn, d_ffn, dtype=torch.float64)
            self.n_keys[layer], done = 0, []
        for e in entries[len(done):]:
            if e.keys is None:
                raise FfkvError(f"the journal's alphaedit entry of layer {layer} has no keys",
                                "write it again with this ffkv version")
            k = e.keys.double()  # (d_ffn, n) float32 as stored, so a reloaded journal sums the same bits
            self.cache_c[layer] = self.cache_c[layer] + k @ k.T
            self.n_keys[layer] += k.shape[1]
        self.counted[layer] = ids
        return self.cache_c[layer]


def state_of(context) -> AlphaEditState:
    """The context's AlphaEdit state (created on first use)."""
    return context.method_state.setdefault(NAME, AlphaEditState())


def projector(context, layer: int, stats, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, null-space dimension) of one layer's statistics, computed once per context."""
    memo = context.method_state.setdefault(NAME + ".P", {})
    key = (layer, stats.corpus, stats.n_tokens, str(stats.path), float(threshold))
    if key not in memo:
        P = null_space_projector(stats.C, threshold)
        memo[key] = (P, int(round(float(P.diagonal().sum()))))
    return memo[key]


def apply(model, requests, hp: dict, journal, context) -> None:
    """One batch over ``hp['layers']``: one journal entry of rank len(requests) per layer (keys kept in it)."""
    if hp.get("expert") is not None:
        raise FfkvError("alphaedit edits dense W_out only", "use memit or rome with expert=...")
    stats = context.layer_stats(model, hp["layers"], hp)
    state = state_of(context)

    def layer_update(site, K, R):
        P, dim = projector(context, site, stats[site], hp["nullspace_threshold"])
        if dim == 0:
            raise FfkvError(f"layer {site}'s statistics have no eigenvalue below nullspace_threshold="
                            f"{hp['nullspace_threshold']}: the null space is empty and nothing can be written",
                            "raise nullspace_threshold")
        cache = state.sync(journal, site, K.shape[0])
        u, v = projected_update(P, cache, K, R, hp["L2"])
        return u, v, {"nullspace_dim": dim, "preserved_edit_keys": state.n_keys[site]}

    memit_edit(model, requests, hp, stats, journal, context.context_prefixes(model, hp["prefixes"], hp["seed"]),
               method=NAME, layer_update=layer_update, progress=context.progress)
