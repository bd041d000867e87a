"""Trigger mining, split along its seams: this module only re-exports the old names for importers.

    ffkv.memory.topk     the top-k engine (TriggerBuffers, merge_topk, prefix hashes)
    ffkv.memory.miner     the resumable run (mine, batches, encode_units, batch_coefficients)
    ffkv.memory.merge    merging atlases of corpus shards (merge_atlases)
    ffkv.memory.oracle   the brute-force reference (brute_force_triggers)
"""

from .merge import merge_atlases
from .miner import ATLAS_VERSION, POSITION_BITS, batch_coefficients, batches, encode_units, max_positions, mine
from .oracle import brute_force_triggers
from .topk import TriggerBuffers, batch_topk, first_occurrences, merge_topk, ordered_bits, prefix_hashes

__all__ = ["ATLAS_VERSION", "POSITION_BITS", "TriggerBuffers", "batch_coefficients", "batch_topk", "batches",
           "brute_force_triggers", "encode_units", "first_occurrences", "max_positions", "merge_atlases",
           "merge_topk", "mine", "ordered_bits", "prefix_hashes"]
