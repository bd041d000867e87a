"""An embedded document index for retrieval: SQLite FTS5 ranked by BM25 (no server, one file).

    build_index(["docs/", "notes.txt"], "world.sqlite")      # text files -> passages -> FTS5
    ix = open_index("world.sqlite")
    ix.search("Quoux Kurte grew up speaking", k=3)            # [Passage(text, doc, score), ...]

A document is a ``.txt``/``.md`` file (one passage per non-empty line, or per paragraph with
``split="paragraph"``) or a ``.jsonl`` file of ``{"text": ...}`` records (one passage each, ``"doc"`` optional).
Passages are ranked by SQLite's ``bm25()`` (Robertson-Sparck Jones, k1 = 1.2, b = 0.75) over the unicode61
tokenizer; a query is reduced to its words, OR-ed, so punctuation and FTS5 operators in a question are inert.
The index records its provenance (ffkv version, sources, counts) in a ``meta`` table. It is written to a temporary
file beside the target and renamed in, so a failed build leaves nothing.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import FfkvError
from ..io import atomic_path, provenance

__all__ = ["Passage", "Index", "build_index", "open_index", "passages_from_files", "fts5_available"]

SCHEMA_VERSION = 1
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Passage:
    text: str
    doc: str
    score: float  # BM25 relevance, larger is better (SQLite's bm25() negated)

    def to_dict(self) -> dict:
        return {"text": self.text, "doc": self.doc, "score": self.score}


def fts5_available() -> bool:
    try:
        con = sqlite3.connect(":memory:")
        con.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        con.close()
        return True
    except sqlite3.OperationalError:
        return False


def _split(text: str, split: str) -> list[str]:
    if split == "paragraph":
        parts = re.split(r"\n\s*\n", text)
    elif split == "line":
        parts = text.splitlines()
    else:
        raise FfkvError(f"unknown split {split!r}", "use 'line' or 'paragraph'")
    return [" ".join(p.split()) for p in parts if p.strip()]


def passages_from_files(sources: Sequence[str | Path], split: str = "line") -> Iterable[tuple[str, str]]:
    """(doc, text) pairs from files and folders (searched recursively for .txt, .md, .jsonl)."""
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".md", ".jsonl") and q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FfkvError(f"document source '{p}' does not exist", "pass text files or folders of them")
    if not files:
        raise FfkvError("no .txt, .md or .jsonl documents found in " + ", ".join(map(str, sources)),
                        "pass text files or folders of them")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FfkvError(f"document '{f}' is not UTF-8 text ({e.reason} at byte {e.start})",
                            "convert it to UTF-8 or leave it out") from None
        if f.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    body = rec["text"]
                    if not isinstance(body, str):
                        raise TypeError
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise FfkvError(f"'{f}' line {n} is not a JSON object with a string \"text\"",
                                    "fix or remove that line") from None
                yield str(rec.get("doc", f"{f.name}:{n}")), " ".join(body.split())
        else:
            for i, para in enumerate(_split(text, split)):
                yield f"{f.name}:{i + 1}", para


def build_index(passages: Iterable[tuple[str, str]] | Sequence[str | Path], out: str | Path,
                split: str = "line", **meta) -> Path:
    """Write an FTS5 index of ``passages`` ((doc, text) pairs, or files/folders to read) to ``out``."""
    if not fts5_available():
        raise FfkvError("this Python's SQLite has no FTS5", "use a Python built with SQLite >= 3.9 and FTS5")
    items = list(passages)
    sources = None
    if items and not isinstance(items[0], tuple):
        sources = [str(s) for s in items]
        items = list(passages_from_files(items, split))
    if not items:
        raise FfkvError("there are no passages to index", "pass documents with text in them")
    out = Path(out)
    with atomic_path(out) as tmp:
        con = sqlite3.connect(str(tmp))
        try:
            con.execute("CREATE VIRTUAL TABLE passages USING fts5(text, doc UNINDEXED, tokenize='unicode61')")
            con.executemany("INSERT INTO passages(text, doc) VALUES (?, ?)", ((t, d) for d, t in items))
            con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
            prov = provenance(None, n_passages=len(items), split=split, sources=sources, **meta)
            prov.update(kind="ffkv-index", schema_version=SCHEMA_VERSION)
            con.execute("INSERT INTO meta VALUES ('provenance', ?)", (json.dumps(prov),))
            con.commit()
        finally:
            con.close()
    return out


class Index:
    """An open index (read-only). ``search(query, k)`` -> the ``k`` best passages by BM25."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        self.provenance = json.loads(self._con.execute("SELECT value FROM meta WHERE key='provenance'")
                                     .fetchone()[0])

    def __len__(self) -> int:
        return int(self._con.execute("SELECT count(*) FROM passages").fetchone()[0])

    def search(self, query: str, k: int = 3) -> list[Passage]:
        words = _WORD.findall(query)
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in dict.fromkeys(words))
        rows = self._con.execute("SELECT text, doc, bm25(passages) AS s FROM passages WHERE passages MATCH ? "
                                 "ORDER BY s LIMIT ?", (match, int(k))).fetchall()
        return [Passage(t, d, -float(s)) for t, d, s in rows]

    def close(self) -> None:
        self._con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_index(path: str | Path) -> Index:
    """Open an index built by :func:`build_index`; anything else is refused in one line."""
    p = Path(path)
    if not p.is_file():
        raise FfkvError(f"index '{p}' does not exist", "build one with 'ffkv index build DOCS --out DB'")
    try:
        ix = Index(p)
    except (sqlite3.DatabaseError, TypeError, json.JSONDecodeError):
        raise FfkvError(f"'{p}' is not an ffkv index (no FTS5 passages table and provenance)",
                        "build one with 'ffkv index build DOCS --out DB'") from None
    if ix.provenance.get("kind") != "ffkv-index":
        raise FfkvError(f"'{p}' is not an ffkv index", "build one with 'ffkv index build DOCS --out DB'")
    return ix


def world_passages(facts: Sequence[dict]) -> list[tuple[str, str]]:
    """The testbed world's texts as passages: every fact stated through each of its training templates.

    facts: records of ``data/facts.jsonl`` (subject, object, train_templates, fact_id). Facts never seen in
    training (``train_count == 0``) are indexed too: the index is the world, the model saw only part of it.
    """
    out = []
    for f in facts:
        for j, t in enumerate(f["train_templates"]):
            out.append((f"fact:{f['fact_id']}:{j}", f"{t.format(f['subject'])} {f['object']}."))
    return out
