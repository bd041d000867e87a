"""``ffkv index`` and ``ffkv ask``: an embedded document index, and answers routed by the recall verdict.

    ffkv index build DOCS... --out world.sqlite          # .txt/.md (a passage per line) and .jsonl {"text": ...}
    ffkv index build --testbed TESTBED_DIR --out DB      # the testbed world's texts (every fact, every template)
    ffkv index search DB --query "Ana Boll was born in" -k 3 --json
    ffkv ask MODEL --index DB --question "Ana Boll was born in" [--route auto|weights|retrieval] --json
"""

from __future__ import annotations

from pathlib import Path

import click

from ..clikit import (FfkvGroup, emit_json, json_option, load_model_from_options, model_options, quiet_option,
                      show_progress)
from ..errors import FfkvError
from .ask import ROUTES, ask
from .data import load_testbed_facts
from .index import build_index, open_index, world_passages


@click.group("index", cls=FfkvGroup)
def index():
    """An embedded document index (SQLite FTS5, BM25) to retrieve passages from."""


@index.command("build")
@click.argument("docs", nargs=-1)
@click.option("--testbed", "testbed_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Index a testbed world's texts (its data/facts.jsonl) instead of DOCS.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The index file to write (.sqlite).")
@click.option("--split", type=click.Choice(["line", "paragraph"]), default="line", show_default=True,
              help="One passage per line or per paragraph of a text file.")
@json_option
def build_cmd(docs, testbed_dir, out, split, as_json):
    """Index text files and folders (DOCS) or a testbed world into one SQLite file."""
    if bool(docs) == (testbed_dir is not None):
        raise FfkvError("give either DOCS or --testbed DIR", "see ffkv index build --help")
    if Path(out).is_dir():
        raise FfkvError(f"--out '{out}' is a folder", "pass a file path such as world.sqlite")
    if testbed_dir is not None:
        facts, _ = load_testbed_facts(testbed_dir)
        path = build_index(world_passages(facts), out, testbed=str(testbed_dir))
    else:
        path = build_index(list(docs), out, split=split)
    with open_index(path) as ix:
        n = len(ix)
    if as_json:
        emit_json({"index": str(path), "passages": n})
    else:
        click.echo(f"indexed {n} passages -> {path}")


@index.command("search")
@click.argument("db")
@click.option("--query", required=True, help="Words to look for (ranked by BM25).")
@click.option("-k", "k", type=click.IntRange(1, 100), default=3, show_default=True, help="Passages to return.")
@json_option
def search_cmd(db, query, k, as_json):
    """The top-k passages of DB for a query."""
    with open_index(db) as ix:
        hits = ix.search(query, k)
    if as_json:
        emit_json({"query": query, "passages": [h.to_dict() for h in hits]})
        return
    for h in hits:
        click.echo(f"{h.score:8.3f}  {h.doc}  {h.text}")


@click.command("ask")
@click.argument("model")
@click.option("--question", required=True, help="The question as a prompt, e.g. 'Ana Boll was born in'.")
@click.option("--index", "index_path", default=None, help="Document index (ffkv index build); needed unless "
                                                          "--route weights.")
@click.option("--route", type=click.Choice(list(ROUTES)), default="auto", show_default=True,
              help="auto: follow the recall verdict; weights: never retrieve; retrieval: always retrieve.")
@click.option("--subject", default=None, help="The subject as written in the question (sharpens the verdict "
                                              "and the search).")
@click.option("-k", "k", type=click.IntRange(1, 20), default=3, show_default=True, help="Passages to place "
                                                                                        "in the context.")
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Longest answer, in tokens.")
@json_option
@quiet_option
@model_options
def ask_cmd(model, question, index_path, route, subject, k, max_new_tokens, as_json, quiet, **load):
    """Answer QUESTION from MODEL's weights or from retrieved passages, as the recall verdict says."""
    ix = open_index(index_path) if index_path is not None else None
    if route != "weights" and ix is None:
        raise FfkvError(f"--route {route} needs --index DB", "build one with 'ffkv index build' or pass "
                                                             "--route weights")
    mm = load_model_from_options(model, **load)
    try:
        a = ask(mm, question, ix, route=route, k=k, subject=subject, max_new_tokens=max_new_tokens,
                progress=show_progress(quiet))
    finally:
        if ix is not None:
            ix.close()
    if as_json:
        emit_json(a.to_dict())
        return
    click.echo(f"answer: {a.answer!r}   (route: {a.route})")
    for p in a.passages:
        click.echo(f"  [{p.doc}] {p.text}")
