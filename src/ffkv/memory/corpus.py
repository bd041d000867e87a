"""A corpus as a deterministic stream of prefix units (sentences or fixed windows of token ids).

Geva et al. (2021) define a trigger example as a *prefix*: a sentence up to and including one position.
A unit is the token sequence the model reads from its start; every position ``t`` of a unit is the prefix
``unit[:t+1]``. The stream is a pure function of (files, tokenizer, split options), so a resumed run can
skip the units it has already consumed and see exactly the same batches again.

**The one corpus reader of ffkv.** ``--corpus`` means the same to ``ffkv atlas mine`` and to the statistics of
``ffkv edit`` (:func:`open_corpus`):

    a path        a file or a folder of files (read recursively in sorted path order):
                  plain text (``.txt``, ``.raw``, ``.tokens``: documents are paragraphs separated by blank
                  lines, a paragraph's lines joined by one space), JSONL (``.jsonl``, one object per line
                  with a text field), Parquet (``.parquet``, a text column) and the Arrow files of a
                  ``datasets.save_to_disk`` folder (``.arrow``)
    "wikitext"    WikiText-2 from the shared data folder (``$FFKV_SHARED_DATA/text/wikitext-2``; its train
                  split when present, else all its files)
    "testbed"     the training text of the testbed world a model was trained on (its ``testbed.json``)
    "auto"        "testbed" for a testbed model, "wikitext" otherwise
    "testbed-S-P" the training text of testbed world seed S, preset P (what "testbed" resolves to)
    a list of strings (Python API only): those documents
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FfkvError
from ..testbed.world import generate_world

SHARED_DATA = Path(os.environ.get("FFKV_SHARED_DATA", Path(__file__).resolve().parents[3].parent / "shared" / "data"))
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet", ".arrow")
NAMED = ("auto", "testbed", "wikitext")
_TESTBED_NAME = re.compile(r"^testbed-(\d+)-([A-Za-z0-9_]+)$")
SPLITS = ("sentence", "window")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Unit:
    """One model input: ``tokens`` (a list of ids), the id of the token after it (``next_id``, -1 if none)."""

    unit: int
    doc: int
    tokens: list
    next_id: int
    source: str


@dataclass(frozen=True)
class CorpusSpec:
    """How a corpus becomes units; recorded in the atlas so that a resume reads the same stream."""

    path: str
    split: str = "sentence"
    window: int = 64  # window length (split="window") or maximum sentence length (split="sentence")
    min_tokens: int = 2
    text_field: str = "text"
    max_units: int | None = None
    docs: str = "paragraph"  # text files: "paragraph" (blank-line separated) or "line" (one document a line)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise FfkvError(f"unknown split '{self.split}'", f"use one of {', '.join(SPLITS)}")
        if self.docs not in ("paragraph", "line"):
            raise FfkvError(f"unknown document split '{self.docs}'", "use paragraph or line")
        if self.window < 2:
            raise FfkvError(f"window must be at least 2 tokens, got {self.window}", "pass --window 64")


def corpus_files(path: str | Path) -> list[Path]:
    """The readable files of a corpus path (a file or a folder), in a fixed order."""
    p = Path(path)
    if not p.exists():
        raise FfkvError(f"corpus path '{path}' does not exist",
                        f"pass a text/JSONL/Parquet file, a folder of them, or one of {', '.join(NAMED)}")
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise FfkvError(f"corpus file '{path}' has an unsupported type '{p.suffix}'",
                            f"use {', '.join(SUFFIXES)}")
        files = [p]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise FfkvError(f"corpus folder '{path}' has no {'/'.join(SUFFIXES)} files", "point to a folder with text")
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise FfkvError(f"corpus file '{f}' cannot be read ({e.strerror})", "check its permissions") from None
    return files


def corpus_fingerprint(files: list[Path]) -> str:
    """Names and sizes of the corpus files: a resume on a changed corpus is refused."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.resolve()}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _text_documents(f: Path, by_line: bool = False) -> Iterator[str]:
    """Paragraphs of a text file (blank-line separated), lines joined by spaces; or its lines."""
    para: list[str] = []
    with open(f, encoding="utf-8-sig", errors="replace") as fh:
        for line in fh:
            s = line.strip()
            if s and by_line:
                yield s
            elif s:
                para.append(s)
            elif para:
                yield " ".join(para)
                para = []
    if para:
        yield " ".join(para)


def _jsonl_documents(f: Path, field: str) -> Iterator[str]:
    with open(f, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise FfkvError(f"{f}:{n} is not valid JSON", "fix or remove the line") from None
            text = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise FfkvError(f"{f}:{n} has no string field '{field}'", "pass --text-field NAME")
            yield text


def _table_documents(f: Path, field: str) -> Iterator[str]:
    try:
        if f.suffix == ".parquet":
            pf = pq.ParquetFile(f)
            if field not in pf.schema_arrow.names:
                raise FfkvError(f"{f} has no column '{field}'", "pass --text-field NAME")
            batches = pf.iter_batches(columns=[field], batch_size=1024)
        else:
            with open(f, "rb") as fh:
                head = fh.read(6)
            reader = pa.ipc.open_file(f) if head == b"ARROW1" else pa.ipc.open_stream(f)
            if field not in reader.schema.names:
                raise FfkvError(f"{f} has no column '{field}'", "pass --text-field NAME")
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
                if head == b"ARROW1" else reader
        for b in batches:
            for text in b.column(field).to_pylist():
                if isinstance(text, str):
                    yield text
    except (pa.ArrowInvalid, OSError) as e:
        raise FfkvError(f"{f} is not a readable {f.suffix[1:]} file ({e})", "check the file") from None


def documents(files: list[Path], text_field: str = "text", by_line: bool = False) -> Iterator[tuple[str, str]]:
    """``(source, text)`` for every document of every file, in order."""
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            docs = _text_documents(f, by_line)
        elif f.suffix == ".jsonl":
            docs = _jsonl_documents(f, text_field)
        else:
            docs = _table_documents(f, text_field)
        for text in docs:
            if text.strip():
                yield f.name, text


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: split after ``.``, ``!`` or ``?`` followed by white space."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def iter_units(tokenizer, spec: CorpusSpec, files: list[Path] | None = None,
               source: "Corpus | None" = None) -> Iterator[Unit]:
    """The units of a corpus, numbered from 0, each at most ``spec.window`` tokens long.

    split="sentence": one unit per sentence (truncated to ``window``); ``next_id`` is the token after it
    (the next sentence's first token, or the token after the truncation). split="window": the document's
    tokens in consecutive windows of ``window`` tokens. Units shorter than ``min_tokens`` are dropped.
    """
    if source is None:
        source = Corpus(Path(spec.path).name, tuple(files), None, "", spec.path) if files is not None \
            else open_corpus(spec.path)
    unit = 0
    for doc, (name, text) in enumerate(source.documents(spec.text_field, spec.docs == "line")):
        if spec.split == "sentence":
            sents = split_sentences(text)
            ids = tokenizer(sents, add_special_tokens=False)["input_ids"] if sents else []
            pieces = []
            for j, toks in enumerate(ids):
                nxt = toks[spec.window] if len(toks) > spec.window else (
                    ids[j + 1][0] if j + 1 < len(ids) and ids[j + 1] else -1)
                pieces.append((toks[: spec.window], nxt))
        else:
            toks = tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces = [(toks[s: s + spec.window], toks[s + spec.window] if s + spec.window < len(toks) else -1)
                      for s in range(0, len(toks), spec.window)]
        for toks, nxt in pieces:
            if len(toks) < spec.min_tokens:
                continue
            yield Unit(unit, doc, list(toks), int(nxt), name)
            unit += 1
            if spec.max_units is not None and unit >= spec.max_units:
                return


# --------------------------------------------------------------------------------------------- named corpora
@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: files to read (``files``) or documents given directly (``texts``).

    name: "wikitext-2", "testbed-SEED-PRESET", the file or folder name, or "texts". fingerprint: names and
    sizes of the files, or a hash of the texts (a resumed run on a changed corpus is refused). spec: what
    :func:`open_corpus` resolves to this corpus again ("wikitext", "testbed-S-P", a resolved path; "texts"
    for a list of strings, which is not resolvable).
    """

    name: str
    files: tuple[Path, ...]
    texts: tuple[str, ...] | None
    fingerprint: str
    spec: str = ""

    def documents(self, text_field: str = "text", by_line: bool = False) -> Iterator[tuple[str, str]]:
        """``(source, text)`` of every document, in order (see :func:`documents`)."""
        if self.texts is None:
            yield from documents(list(self.files), text_field, by_line)
            return
        for text in self.texts:
            if text.strip():
                yield self.name, text

    def texts_list(self, text_field: str = "text") -> list[str]:
        """Every document's text, in order."""
        return [t for _, t in self.documents(text_field)]


def testbed_world_of(model):
    """The testbed world a model was trained on (from its folder's ``testbed.json``), or None."""
    if model is None:
        return None
    p = Path(str(model.name_or_path))
    for meta_path in (p / "testbed.json", p.parent / "model" / "testbed.json"):
        if meta_path.exists():
            try:
                world = json.loads(meta_path.read_text())["hyperparameters"]["world"]
                return generate_world(int(world["seed"]), world["preset"])
            except (KeyError, ValueError, json.JSONDecodeError, FfkvError):
                return None
    return None


def _texts_corpus(name: str, texts: Sequence[str]) -> Corpus:
    texts = tuple(str(t) for t in texts)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    return Corpus(name, (), texts, digest, name)


def open_corpus(corpus: str | Path | Sequence[str], model=None) -> Corpus:
    """Resolve a corpus spec (see the module docstring) to a :class:`Corpus`; ``model`` for "auto"/"testbed"."""
    if not isinstance(corpus, (str, Path)):
        texts = list(corpus)
        if not any(str(t).strip() for t in texts):
            raise FfkvError("the corpus is empty", "pass a non-empty list of texts")
        return _texts_corpus("texts", texts)
    spec = str(corpus)
    named = _TESTBED_NAME.match(spec)
    if named:
        world = generate_world(int(named.group(1)), named.group(2))
        return _texts_corpus(f"testbed-{world.seed}-{world.preset}", world.documents())
    if spec in ("auto", "testbed"):
        world = testbed_world_of(model)
        if world is not None:
            return _texts_corpus(f"testbed-{world.seed}-{world.preset}", world.documents())
        if spec == "testbed":
            name = getattr(model, "name_or_path", None)
            raise FfkvError(f"model '{name}' is not a testbed model (no testbed.json)" if model is not None
                            else "corpus 'testbed' needs the model it was trained for",
                            "pass --corpus wikitext or a text file or folder")
        spec = "wikitext"
    if spec == "wikitext":
        folder = SHARED_DATA / "text" / "wikitext-2"
        if not folder.exists():
            raise FfkvError(f"WikiText-2 is not at {folder}",
                            "pass --corpus with a text file or folder, or set FFKV_SHARED_DATA")
        files = corpus_files(folder)
        train = [f for f in files if "train" in f.name]
        files = train or files
        return Corpus("wikitext-2", tuple(files), None, corpus_fingerprint(files), "wikitext")
    p = Path(spec)
    files = corpus_files(p)
    return Corpus(p.name, tuple(files), None, corpus_fingerprint(files), str(p.resolve()))
