"""Training-frequency buckets of the testbed's facts: the one definition, for reports, recall and locate.

A fact's ``train_count`` is how many times it was stated in the training text. The buckets are the README's
(doubling widths):

    1 | 2-3 | 4-7 | 8-15 | 16-31 | 32+

and "0" for subjects the model never saw (recall's invented subjects). :data:`FREQUENT` (seen 30 times or more)
is a summary row of the recall report, not a bucket: it overlaps 16-31 and 32+.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterable, NamedTuple

from ..errors import FfkvError

OPEN = 10 ** 9  # upper edge of the open last bucket


class Bucket(NamedTuple):
    """Facts with ``lo <= train_count <= hi``; unpacks as ``name, lo, hi``."""

    name: str
    lo: int
    hi: int

    def holds(self, train_count: int) -> bool:
        return self.lo <= train_count <= self.hi


UNSEEN = Bucket("0", 0, 0)
BUCKETS = (Bucket("1", 1, 1), Bucket("2-3", 2, 3), Bucket("4-7", 4, 7), Bucket("8-15", 8, 15),
           Bucket("16-31", 16, 31), Bucket("32+", 32, OPEN))
FREQUENT = Bucket("frequent (>=30)", 30, OPEN)
# Every bucket a count falls in, lowest first: "0" (never seen), then the README's six.
BUCKET_NAMES = [UNSEEN.name] + [b.name for b in BUCKETS]


def bucket_of(train_count: int) -> str:
    """The frequency bucket name of a training count ("0" for a fact never seen)."""
    for b in (UNSEEN, *BUCKETS):
        if b.holds(int(train_count)):
            return b.name
    raise FfkvError(f"train_count {train_count} is negative", "check the facts file")


def group_by_bucket(facts: Iterable[dict]) -> dict[str, list[dict]]:
    """``{bucket name: [facts]}`` by each fact's ``train_count``, facts in their given order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for f in facts:
        groups[bucket_of(f["train_count"])].append(f)
    return dict(groups)


def stratified_facts(facts: list[dict], per_bucket: int, seed: int | str = 0) -> list[dict]:
    """Up to ``per_bucket`` facts from every frequency bucket (a seeded sample of each), in fact order."""
    rng = random.Random(seed)
    groups = group_by_bucket(facts)
    chosen = []
    for name in BUCKET_NAMES:
        group = groups.get(name, [])
        chosen.extend(rng.sample(group, min(per_bucket, len(group))))
    return sorted(chosen, key=lambda f: f.get("fact_id", 0))
