"""Edit the facts an FFN layer stores: ROME, MEMIT and knowledge-neuron edits, with an undoable journal.

    from ffkv.edit import EditRequest, apply_edits, Journal
    req = EditRequest("{} is located in", "Eiffel Tower", " Rome", target_true=" Paris")
    journal = apply_edits(model, [req], method="rome")        # edits the model in place
    journal.undo(model)                                          # restores the weights bit for bit

The methods are plug-ins (:mod:`ffkv.edit.registry`, one module each in :mod:`ffkv.edit.methods`).
See docs/edit.md for the equations, the hyperparameters and the command line (``ffkv edit``).
"""

from . import kn_edit as _kn_edit
from .api import apply_edits, save_edited, undo_folder
from .context import EditContext
from .hparams import default_hparams, load_hparams, parse_settings, resolve_hparams
from .journal import Journal, JournalEntry, weight_checksum
from .registry import METHODS, EditMethod, get_method
from .requests import EditRequest, load_requests
from .stats import SecondMoment, layer_stats

__all__ = ["EditRequest", "apply_edits", "Journal", "JournalEntry", "default_hparams", "layer_stats",
           "SecondMoment", "load_requests", "save_edited", "undo_folder", "weight_checksum", "EditContext",
           "EditMethod", "METHODS", "get_method", "load_hparams", "parse_settings", "resolve_hparams",
           "erase_relation", "find_knowledge_neurons"]


def __getattr__(name):
    # kn_edit's public names (its owner may rename find_knowledge_neurons): read from the module
    if name in ("erase_relation", "find_knowledge_neurons"):
        return getattr(_kn_edit, name)
    raise AttributeError(f"module 'ffkv.edit' has no attribute {name!r}")
