"""A corpus as a deterministic stream of prefix units (sentences or fixed windows of token ids).

Geva et al. (2021) define a trigger example as a *prefix*: a sentence up to and including one position.
A unit is the token sequence the model reads from its start; every position ``t`` of a unit is the prefix
``unit[:t+1]``. The stream is a pure function of (files, tokenizer, split options), so a resumed run can
skip the units it has already consumed and see exactly the same batches again.

Readers: plain text (``.txt``: documents are paragraphs separated by blank lines), JSONL (``.jsonl``, one
object per line with a text field), Parquet (``.parquet``, a text column) and the Arrow files of a
``datasets.save_to_disk`` folder (``.arrow``). A folder is read recursively in sorted path order.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import FfkvError

SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
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
        raise FfkvError(f"corpus path '{path}' does not exist", "pass a text/JSONL/Parquet file or a folder of them")
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
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        if f.suffix == ".txt":
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


def iter_units(tokenizer, spec: CorpusSpec, files: list[Path] | None = None) -> Iterator[Unit]:
    """The units of a corpus, numbered from 0, each at most ``spec.window`` tokens long.

    split="sentence": one unit per sentence (truncated to ``window``); ``next_id`` is the token after it
    (the next sentence's first token, or the token after the truncation). split="window": the document's
    tokens in consecutive windows of ``window`` tokens. Units shorter than ``min_tokens`` are dropped.
    """
    files = files if files is not None else corpus_files(spec.path)
    unit = 0
    for doc, (source, text) in enumerate(documents(files, spec.text_field, spec.docs == "line")):
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
            yield Unit(unit, doc, list(toks), int(nxt), source)
            unit += 1
            if spec.max_units is not None and unit >= spec.max_units:
                return
