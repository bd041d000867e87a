"""The fault suite (issue 14): every command, every kind of bad input -> one line, exit code 2, output unchanged.

:data:`CASES` is the table, one row per (command, kind of bad input). Each row runs the command as a user
types it (``ffkv.cli.main`` in this process; ``proc`` rows in a subprocess) and asserts

- no traceback, and exactly one line on stderr, starting ``ffkv: error:`` (click's usage errors included);
- exit code 2;
- the output path unchanged: absent when it was absent, byte-identical when it existed, and nothing new
  beside it (no partial output, no temporary left behind);
- the line contains the row's ``expect`` text, where the row gives one.

``guard`` names the work a
refusal must come before (training a model, serving, running the demo's steps): it is stubbed so that a bad
value that is accepted fails the row at once instead of running for minutes.

docs/faults.md is generated from the table (``python tests/test_faults.py > docs/faults.md``) and a test keeps
the two equal; ``python tests/test_faults.py --run`` runs the suite and prints its counts.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from ffkv import validate
from ffkv.cli import cli, main

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "faults.md"
LONG = " ".join(["It is known that Zashand Shaivsosk is a citizen of"] * 30)  # ~300 tokens, context is 128
SUBJECT = "Zashand Shaivsosk"
EDIT = f"--prompt '{{}} is a citizen of' --subject '{SUBJECT}' --target Kenya"


@dataclass(frozen=True)
class Case:
    command: str  # "atlas mine"; "" is the root
    kind: str  # "number: huge", ...
    args: str  # after the command words, shell-quoted; {placeholders} as in _Env.resolve
    expect: str | None = None  # text the line must contain
    guard: tuple[str, ...] = ()  # functions stubbed to fail the row if reached
    proc: bool = False  # run in a subprocess
    fault: str | None = None  # "ENOSPC" / "EROFS": every final rename of an output fails so (see _fail_writes)


def C(command, kind, args="", expect=None, guard=(), proc=False, fault=None) -> Case:
    return Case(command, kind, args, expect, tuple(guard), proc, fault)


RANGE = "is not in the range"
NOT_INT = "is not a valid integer"
NONFINITE = "is not a finite number"
MISSING = "does not exist"
SERVE_GUARD = ("ffkv.serve.cli.run_server",)
TRACE_GUARD = ("ffkv.locate.cli.causal_traces",)
NEURONS_GUARD = ("ffkv.locate.cli.knowledge_neurons",)
EVAL_GUARD = ("ffkv.evaluate.cli.evaluate_edits", "ffkv.evaluate.cli.sequential_edits")

CASES: list[Case] = [
    # ---------------------------------------------------------------- the root: click's usage errors in one line
    C("", "usage: unknown command", "nonsense", "no such command 'nonsense'", proc=True),
    C("", "usage: unknown option", "--nonsense", "no such option"),
    # ---------------------------------------------------------------- census
    C("census", "usage: missing argument", "", "missing argument 'MODEL'"),
    C("census", "path: missing", "{tmp}/no-model", "not found"),
    C("census", "path: unrelated", "{tb}/data", "has no config.json"),
    C("census", "model: corrupt config", "{m:config}", "is not valid JSON"),
    # ---------------------------------------------------------------- inspect
    C("inspect", "path: missing", "{tmp}/no-model", "not found"),
    C("inspect", "path: unrelated", "{tb}/data", "has no config.json"),
    C("inspect", "number: zero", "{model} --threads 0", RANGE),
    C("inspect", "number: huge", "{model} --threads 1000000000", RANGE),
    C("inspect", "usage: bad choice", "{model} --dtype float7", "invalid value for '--dtype'"),
    C("inspect", "model: truncated weights", "{m:truncated}", "is truncated"),
    C("inspect", "model: empty weights", "{m:empty}", "is empty"),
    C("inspect", "model: shapes unlike config", "{m:shape}", "do not match its config.json"),
    C("inspect", "model: corrupt config", "{m:config}", "is not valid JSON"),
    C("inspect", "device: absent", "{model} --device cuda:7", "has no CUDA"),
    C("inspect", "device: bad map", "{model} --device-map nonsense", "--device-map"),
    # ---------------------------------------------------------------- testbed
    C("testbed build", "usage: missing option", "", "missing option '--out'"),
    C("testbed build", "number: zero", "--preset tiny --out {out} --steps 0", RANGE),
    C("testbed build", "number: huge", "--preset tiny --out {out} --steps 100000000000", RANGE),
    C("testbed build", "number: non-integer", "--preset tiny --out {out} --steps 1e9", NOT_INT),
    C("testbed build", "number: negative", "--preset tiny --out {out} --seed -1", RANGE),
    C("testbed build", "path: missing", "--preset tiny --out {out} --pararel {tmp}/no-pararel", MISSING),
    C("testbed build", "out: unrelated folder", "--preset tiny --out {keep} --steps 1 --no-report", "is a non-empty folder that is not an ffkv", guard=("ffkv.testbed.train.train_model",)),
    C("testbed world", "number: negative", "--preset tiny --out {out} --seed -5", RANGE),
    C("testbed world", "usage: bad choice", "--preset huge --out {out}", "invalid value for '--preset'"),
    C("testbed world", "out: unrelated folder", "--preset tiny --out {keep}", "is a non-empty folder that is not an ffkv"),
    C("testbed report", "path: missing", "{tmp}/no-testbed", "is not a testbed folder"),
    C("testbed report", "path: unrelated", "{tb}/data", "is not a testbed folder"),
    C("testbed report", "number: zero", "{tb} --samples 0", RANGE),
    C("testbed report", "number: huge", "{tb} --samples 1000000000", RANGE),
    C("testbed report", "number: negative", "{tb} --max-facts-per-bucket -1", RANGE),
    C("testbed", "usage: unknown command", "nonsense", "no such command 'nonsense'"),
    C("testbed default", "usage: bad choice", "--arch bert", "invalid value for '--arch'"),
    # ---------------------------------------------------------------- atlas
    C("atlas", "usage: unknown command", "nonsense", "no such command 'nonsense'"),
    C("atlas mine", "usage: missing option", "{model} --out {out}", "missing option '--corpus'"),
    C("atlas mine", "number: zero", "{model} --corpus {f:corpus.txt} --out {out} --checkpoint-every 0", RANGE),
    C("atlas mine", "number: huge", "{model} --corpus {f:corpus.txt} --out {out} --top-k 1000000000", RANGE),
    C("atlas mine", "number: zero", "{model} --corpus {f:corpus.txt} --out {out} --batch-tokens 0", RANGE),
    C("atlas mine", "number: zero", "{model} --corpus {f:corpus.txt} --out {out} --max-units 0", RANGE),
    C("atlas mine", "number: negative", "{model} --corpus {f:corpus.txt} --out {out} --window -5", RANGE),
    C("atlas mine", "number: non-integer", "{model} --corpus {f:corpus.txt} --out {out} --top-k 2.5", NOT_INT),
    C("atlas mine", "path: missing", "{model} --corpus {tmp}/no-corpus.txt --out {out}", MISSING),
    C("atlas mine", "path: unrelated", "{tb}/data --corpus {f:corpus.txt} --out {out}", "has no config.json"),
    C("atlas mine", "data: JSONL bad line", "{model} --corpus {f:corpus_bad_line.jsonl} --out {out}",
      "corpus_bad_line.jsonl:2 is not valid JSON"),
    C("atlas mine", "data: empty", "{model} --corpus {f:empty.txt} --out {out}", "yields no units"),
    C("atlas mine", "out: unrelated folder", "{model} --corpus {f:corpus.txt} --out {keep}",
      "exists and is not an atlas"),
    C("atlas mine", "model: non-finite weights", "{m:nan} --corpus {f:corpus.txt} --out {out}", "non-finite"),
    C("atlas merge", "usage: missing argument", "{out}", "missing argument 'PARTS...'"),
    C("atlas merge", "path: missing", "{out} {tmp}/no-atlas", "no atlas"),
    C("atlas merge", "path: unrelated", "{out} {tb}/data", "no atlas"),
    C("atlas analyze", "path: missing", "{tmp}/no-atlas", "no atlas"),
    C("atlas analyze", "path: unrelated", "{tb}/model", "no atlas"),
    C("atlas analyze", "number: zero", "{atlas} --composition-units 0", RANGE),
    C("atlas analyze", "number: nan", "{atlas} --active-threshold nan", NONFINITE),
    C("atlas analyze", "number: huge", "{atlas} --pattern-threshold 2", RANGE),
    C("atlas analyze", "usage: bad choice", "{atlas} --steps bogus", "unknown analysis step"),
    C("atlas analyze", "data: corrupt atlas", "{f:atlas_bad_meta}", "has a bad field 'n_layers'"),
    C("atlas report", "path: missing", "{tmp}/no-atlas", "no atlas"),
    C("atlas report", "number: negative", "{atlas} --composition-units -3", RANGE),
    C("atlas summary", "path: missing", "{tmp}/no-atlas", "no atlas"),
    C("atlas summary", "path: unrelated", "{tb}/data", "no atlas"),
    C("atlas memory", "usage: missing argument", "{atlas}", "missing argument 'MEMORY'"),
    C("atlas memory", "layer: not a number", "{atlas} abc", "abc"),
    C("atlas memory", "layer: absent", "{atlas} 99.0", "99"),
    C("atlas memory", "number: negative", "{atlas} 0.1 -n -1", RANGE),
    C("atlas memory", "number: huge", "{atlas} 0.1 --top-tokens 1000000000", RANGE),
    C("atlas promotes", "usage: missing argument", "{atlas}", "missing argument 'TOKEN'"),
    C("atlas promotes", "number: zero", "{atlas} Paris -n 0", RANGE),
    C("atlas promotes", "number: negative", "{atlas} Paris --triggers -1", RANGE),
    C("atlas promotes", "prompt: empty token", "{atlas} ''", "the token is empty"),
    C("atlas nearest", "usage: missing option", "{atlas}", "give exactly one of --memory and --token"),
    C("atlas nearest", "layer: not a number", "{atlas} --memory abc", "abc"),
    C("atlas nearest", "layer: absent", "{atlas} --memory 99.0", "99"),
    C("atlas nearest", "number: zero", "{atlas} --memory 0.1 -n 0", RANGE),
    C("atlas nearest", "prompt: empty token", "{atlas} --token ''", "the token is empty"),
    C("atlas subupdates", "usage: missing option", "{model}", "missing option '--prompt'"),
    C("atlas subupdates", "prompt: empty", "{model} --prompt ''", "empty"),
    C("atlas subupdates", "prompt: too long", f"{{model}} --prompt '{LONG}'", "longer than the model's context"),
    C("atlas subupdates", "number: negative", "{model} --prompt 'a b' --top-n -1", RANGE),
    C("atlas subupdates", "number: huge", "{model} --prompt 'a b' --top-n 1000000000", RANGE),
    C("atlas subupdates", "number: huge", "{model} --prompt 'a b' --position 100000000000", RANGE),
    C("atlas subupdates", "number: negative", "{model} --prompt 'a b' --generate -1", RANGE),
    C("atlas subupdates", "layer: not a number", "{model} --prompt 'a b' --layers abc", "is not a list of layers"),
    C("atlas subupdates", "layer: absent", "{model} --prompt 'a b' --layers 99", "the model has 6 layers"),
    C("atlas subupdates", "number: non-integer", "{model} --prompt 'a b' --positions a", "--positions"),
    C("atlas subupdates", "layer: not a number", "{model} --prompt 'a b' --off abc", "abc"),
    # ---------------------------------------------------------------- trace
    C("trace", "usage: missing option", "{model}", "trace needs --prompt and --subject"),
    C("trace", "prompt: empty", "{model} --prompt ' ' --subject ' '", "empty"),
    C("trace", "prompt: too long", f"{{model}} --prompt '{LONG}' --subject '{SUBJECT}'",
      "longer than the model's context"),
    C("trace", "number: zero", f"{{model}} --prompt 'x y' --subject x --samples 0", RANGE),
    C("trace", "number: huge", f"{{model}} --prompt 'x y' --subject x --samples 1000000000", RANGE),
    C("trace", "number: non-integer", f"{{model}} --prompt 'x y' --subject x --samples 1e9", NOT_INT),
    C("trace", "number: negative", f"{{model}} --prompt 'x y' --subject x --seed -1", RANGE),
    C("trace", "number: nan", f"{{model}} --prompt 'x y' --subject x --noise nan", "finite number",
      guard=TRACE_GUARD),
    C("trace", "layer: not a number", f"{{model}} --prompt 'x y' --subject x --layers abc", "is not a list of layers"),
    C("trace", "layer: absent", f"{{model}} --prompt 'x y' --subject x --layers 99", "the model has 6 layers"),
    C("trace", "path: missing", "{model} --known {tmp}/no-known.json", MISSING),
    C("trace", "data: missing field", "{model} --known {f:known_missing.json}", "lacks the field"),
    C("trace", "out: unrelated folder", f"{{model}} --prompt 'x y' --subject x --samples 1 --out {{keep}}",
      "is a non-empty folder that is not an ffkv", guard=TRACE_GUARD),
    C("trace", "model: truncated weights", f"{{m:truncated}} --prompt 'x y' --subject x", "is truncated"),
    C("trace", "model: non-finite weights", f"{{m:nan}} --prompt 'x y' --subject x --samples 1", "non-finite"),
    # ---------------------------------------------------------------- neurons
    C("neurons", "usage: missing option", "{model} --prompt 'x y'", "missing option '--answer'"),
    C("neurons", "prompt: empty", "{model} --prompt '' --answer Peru", "empty"),
    C("neurons", "prompt: too long", f"{{model}} --prompt '{LONG}' --answer Peru", "longer than the model's context"),
    C("neurons", "number: zero", "{model} --prompt 'x y' --answer Peru --steps 0", RANGE),
    C("neurons", "number: huge", "{model} --prompt 'x y' --answer Peru --steps 100000000000", RANGE),
    C("neurons", "number: nan", "{model} --prompt 'x y' --answer Peru --threshold nan", NONFINITE),
    C("neurons", "number: zero", "{model} --prompt 'x y' --answer Peru --share 0", RANGE),
    C("neurons", "number: zero", "{model} --prompt 'x y' --answer Peru --max-neurons 0", RANGE),
    C("neurons", "layer: absent", "{model} --prompt 'x y' --answer Peru --layers 99", "the model has 6 layers"),
    C("neurons", "usage: malformed value", "{model} --prompt 'x y' --answer Peru --unrelated nobar",
      "is not 'PROMPT|ANSWER'"),
    C("neurons", "usage: bad choice", "{model} --prompt 'x y' --answer Peru --method bogus --steps 1",
      "invalid value for '--method'", guard=NEURONS_GUARD),
    C("neurons", "out: unrelated folder", "{model} --prompt 'x y' --answer Peru --steps 1 --out {keep}",
      "is a non-empty folder that is not an ffkv", guard=NEURONS_GUARD),
    # ---------------------------------------------------------------- edit
    C("edit", "usage: unknown command", "undo", "missing argument 'SRC'"),
    C("edit apply", "usage: missing option", f"{{model}} {EDIT}", "missing option '--out'"),
    C("edit apply", "usage: missing option", "{model} --subject x --out {out}", "an edit needs --prompt"),
    C("edit apply", "usage: bad choice", f"{{model}} {EDIT} --method bogus --out {{out}}",
      "invalid value for '--method'"),
    C("edit apply", "prompt: empty", "{model} --prompt '' --subject x --target y --out {out}",
      "does not occur in prompt ''"),
    C("edit apply", "prompt: too long", f"{{model}} --prompt '{LONG.replace(SUBJECT, '{}', 1)}' --subject '{SUBJECT}' "
      "--target Kenya --out {out}", "longer than the model's context"),
    C("edit apply", "number: zero", f"{{model}} --requests {{f:requests.json}} --limit 0 --out {{out}}", RANGE),
    C("edit apply", "layer: not a number", f"{{model}} {EDIT} --layer abc --out {{out}}", "is not a list of layers"),
    C("edit apply", "layer: absent", f"{{model}} {EDIT} --layer 99 --out {{out}}", "the model has 6 layers"),
    C("edit apply", "hparams: bad JSON", f"{{model}} {EDIT} --hparams '{{bad' --out {{out}}", "is not valid JSON"),
    C("edit apply", "hparams: JSON list", f"{{model}} {EDIT} --hparams '[1, 2]' --out {{out}}", "not a list"),
    C("edit apply", "hparams: unknown key", f"{{model}} {EDIT} --hparams '{{\"nope\": 1}}' --out {{out}}",
      "unknown rome hyperparameter(s): nope"),
    C("edit apply", "hparams: missing file", f"{{model}} {EDIT} --hparams {{tmp}}/no-hparams.yaml --out {{out}}",
      "no hyperparameter file"),
    C("edit apply", "hparams: absurd value", f"{{model}} {EDIT} --set v_num_grad_steps=-1 --out {{out}}",
      "v_num_grad_steps=-1 must be a positive integer"),
    C("edit apply", "hparams: absurd value", f"{{model}} {EDIT} --hparams '{{\"v_lr\": \"fast\"}}' --out {{out}}",
      "v_lr='fast' must be a finite number"),
    C("edit apply", "set: unknown key", f"{{model}} {EDIT} --set nope=1 --out {{out}}",
      "unknown rome hyperparameter(s): nope"),
    C("edit apply", "set: malformed", f"{{model}} {EDIT} --set =3 --out {{out}}", "--set expects key=value"),
    C("edit apply", "path: missing", f"{{model}} --requests {{tmp}}/no-requests.json --out {{out}}", MISSING),
    C("edit apply", "data: JSONL bad line", f"{{model}} --requests {{f:requests_bad_line.jsonl}} --out {{out}}",
      "line 2"),
    C("edit apply", "data: missing field", f"{{model}} --requests {{f:requests_missing.json}} --out {{out}}",
      "target"),
    C("edit apply", "out: unrelated folder", f"{{model}} {EDIT} --method kn --out {{keep}}",
      "is a non-empty folder that is not an ffkv", guard=("ffkv.edit.cli.apply_edits",)),
    C("edit apply", "model: truncated weights", f"{{m:truncated}} {EDIT} --out {{out}}", "is truncated"),
    C("edit undo", "usage: missing argument", "--out {out}", "missing argument 'SRC'"),
    C("edit undo", "path: missing", "{tmp}/no-edit --out {out}", MISSING),
    C("edit undo", "path: unrelated", "{tb} --out {out}", "journal"),
    C("edit undo", "number: zero", "{tb} --out {out} -n 0", RANGE),
    C("edit undo", "data: corrupt journal", "{f:journal_no_entries} --out {out}", "entries"),
    C("edit stats", "usage: missing option", "{model}", "needs --layers"),
    C("edit stats", "layer: not a number", "{model} --layers abc", "is not a list of layers"),
    C("edit stats", "layer: absent", "{model} --layers 99", "the model has 6 layers"),
    C("edit stats", "number: negative", "{model} --layers 1 --tokens -5", RANGE),
    C("edit stats", "number: huge", "{model} --layers 1 --tokens 100000000000", RANGE),
    C("edit stats", "number: zero", "{model} --layers 1 --texts 0", RANGE),
    C("edit stats", "path: unrelated", "{model} --layers 1 --stats-dir {f:corpus.txt}", "is a file"),
    C("edit erase", "usage: missing option", "{model} --out {out}", "missing option '--requests'"),
    C("edit erase", "path: missing", "{model} --requests {tmp}/no-requests.json --out {out}", MISSING),
    C("edit erase", "number: nan", "{model} --requests {f:requests.json} --min-share nan --out {out}", NONFINITE),
    C("edit erase", "number: huge", "{model} --requests {f:requests.json} --min-share 2 --out {out}", RANGE),
    C("edit erase", "data: JSONL bad line", "{model} --requests {f:requests_bad_line.jsonl} --out {out}",
      "line 2"),
    # ---------------------------------------------------------------- evaluate
    C("evaluate", "usage: missing option", "{model}", "no edit data given"),
    C("evaluate", "path: missing", "{model} --data {tmp}/no-data.json", MISSING),
    C("evaluate", "path: unrelated", "{model} --data {tb}/model", "has no counterfact.json"),
    C("evaluate", "path: unrelated", "{tb} --stats-dir {f:corpus.txt}", "is a file"),
    C("evaluate", "number: zero", "{tb} --limit 0", RANGE),
    C("evaluate", "number: negative", "{tb} --limit -1", RANGE),
    C("evaluate", "number: zero", "{tb} --gen-tokens 0", RANGE),
    C("evaluate", "number: negative", "{tb} --gen-tokens -1", RANGE),
    C("evaluate", "number: huge", "{tb} --gen-tokens 1000000000", RANGE),
    C("evaluate", "number: zero", "{tb} --batch-size 0", RANGE),
    C("evaluate", "number: huge", "{tb} --sequential 1000000000", RANGE),
    C("evaluate", "number: huge", "{tb} --sequential 100000 --probes 0", "fewer than the 100000 sequential edits",
      guard=EVAL_GUARD),
    C("evaluate", "set: unknown key", "{tb} --set nope=1", "unknown rome hyperparameter(s): nope", guard=EVAL_GUARD),
    C("evaluate", "set: malformed", "{tb} --set =1", "--set expects key=value", guard=EVAL_GUARD),
    C("evaluate", "layer: absent", "{tb} --set layer=99", "layer 99 is out of range", guard=EVAL_GUARD),
    C("evaluate", "layer: absent", "{tb} --method memit --set 'layers=[1,99]'", "layer 99 is out of range",
      guard=EVAL_GUARD),
    C("evaluate", "layer: not a number", "{tb} --set layer=abc", "layer must be an integer", guard=EVAL_GUARD),
    C("evaluate", "hparams: unknown key", "{tb} --hparams '{\"nope\": 1}'", "unknown rome hyperparameter(s)",
      guard=EVAL_GUARD),
    C("evaluate", "hparams: bad JSON", "{tb} --hparams '{bad'", "is not valid JSON", guard=EVAL_GUARD),
    C("evaluate", "hparams: JSON list", "{tb} --hparams '[1]'", "not a list", guard=EVAL_GUARD),
    C("evaluate", "out: format", "{tb} --out {tmp}/rows.txt", "--out rows.txt: unknown format", guard=EVAL_GUARD),
    C("evaluate", "out: format", "{tb} --out {tmp}/rows", "--out rows: unknown format", guard=EVAL_GUARD),
    C("evaluate", "out: format", "{tb} --sequential 2 --out {tmp}/curves.csv", "--sequential writes a folder",
      guard=EVAL_GUARD),
    C("evaluate", "usage: bad choice", "{tb} --method bogus", "invalid value for '--method'"),
    C("evaluate", "data: missing field", "{model} --data {f:counterfact_missing.json}", "subject",
      guard=EVAL_GUARD),
    C("evaluate", "data: JSONL bad line", "{model} --data {f:counterfact_bad_line.jsonl}", "line 2",
      guard=EVAL_GUARD),
    C("evaluate", "model: truncated weights", "{m:truncated} --data {tb}/data/counterfact.json",
      "is truncated", guard=EVAL_GUARD),
    # ---------------------------------------------------------------- recall
    C("recall", "usage: missing option", "{model}", "give either --prompt"),
    C("recall", "prompt: empty", "{model} --prompt ' '", "empty"),
    C("recall", "prompt: too long", f"{{model}} --prompt '{LONG}'", "longer than the model's context"),
    C("recall", "number: zero", "{model} --prompt 'x y' --samples 0", RANGE),
    C("recall", "number: huge", "{model} --prompt 'x y' --samples 1000000000", RANGE),
    C("recall", "number: nan", "{model} --prompt 'x y' --temperature nan", NONFINITE),
    C("recall", "number: huge", "{model} --prompt 'x y' --temperature inf", NONFINITE),
    C("recall", "number: negative", "{model} --prompt 'x y' --temperature -1", RANGE),
    C("recall", "number: negative", "{model} --prompt 'x y' --seed -1", RANGE),
    C("recall", "path: missing", "{model} --prompt 'x y' --weights {tmp}/no-weights.json", MISSING),
    C("recall", "data: bad JSON", "{model} --prompt 'x y' --weights {f:bad.json}", "is not valid JSON"),
    C("recall", "path: missing", "{model} --facts {tmp}/no-facts.jsonl --out {out}.parquet", MISSING),
    C("recall", "data: JSONL bad line", "{model} --facts {f:facts_bad_line.jsonl} --out {out}.parquet",
      "line 3 is not valid JSON"),
    C("recall", "data: missing field", "{model} --facts {f:facts_missing.jsonl} --out {out}.parquet",
      "line 2 lacks the field 'object'"),
    C("recall", "usage: missing option", "{model} --facts {tb}", "--facts needs --out"),
    C("recall", "out: format", "{model} --facts {tb} --out {out}.csv", "--out out.csv: unknown format"),
    C("recall", "number: zero", "{model} --facts {tb} --out {out}.parquet --per-bucket 0", RANGE),
    C("recall", "model: truncated weights", "{m:truncated} --prompt 'x y'", "is truncated"),
    C("recall", "model: non-finite weights", "{m:nan} --prompt 'x y'", "non-finite"),
    # ---------------------------------------------------------------- dossier
    C("dossier", "usage: missing option", "{model} --prompt 'x y' --subject x --out {out}", "missing option"),
    C("dossier", "prompt: subject absent", "{model} --prompt 'x y' --subject zzz --answer a --out {out}", "zzz"),
    C("dossier", "prompt: empty", "{model} --prompt '' --subject x --answer a --out {out}", "the prompt is empty"),
    C("dossier", "number: zero", "{model} --prompt 'x y' --subject x --answer a --out {out} --samples 0", RANGE),
    C("dossier", "model: truncated weights", "{m:truncated} --prompt 'x y' --subject x --answer a --out {out}", "is truncated"),
    # ---------------------------------------------------------------- explain
    C("explain", "usage: missing option", "{model} --candidates a b", "missing option '--prompt'"),
    C("explain", "usage: one candidate", "{model} --prompt 'x y' --candidates a", "at least two candidates"),
    C("explain", "prompt: empty", "{model} --prompt '' --candidates a b", "empty"),
    C("explain", "number: zero", "{model} --prompt 'x y' --candidates a b --top-n 0", RANGE),
    C("explain", "layer: absent", "{model} --prompt 'x y' --candidates a b --layers 99", "layer"),
    C("explain", "model: truncated weights", "{m:truncated} --prompt 'x y' --candidates a b", "is truncated"),
    # ---------------------------------------------------------------- index
    C("index", "usage: unknown command", "nonsense", "no such command 'nonsense'"),
    C("index build", "usage: nothing to index", "--out {out}.sqlite", "give either DOCS or --testbed"),
    C("index build", "path: missing", "{tmp}/no-docs --out {out}.sqlite", MISSING),
    C("index build", "data: JSONL bad line", "{f:corpus_bad_line.jsonl} --out {out}.sqlite", "line 2"),
    C("index search", "path: missing", "{tmp}/no-index.sqlite --query x", MISSING),
    C("index search", "data: not an index", "{f:bad.json} --query x", "not an ffkv index"),
    C("index search", "number: zero", "{f:bad.json} --query x -k 0", RANGE),
    # ---------------------------------------------------------------- ask
    C("ask", "usage: missing option", "{model}", "missing option '--question'"),
    C("ask", "usage: retrieval without an index", "{model} --question 'x y' --route retrieval", "needs --index"),
    C("ask", "path: missing", "{model} --question 'x y' --index {tmp}/no-index.sqlite", MISSING),
    C("ask", "prompt: empty", "{model} --question ' ' --route weights", "empty"),
    C("ask", "number: huge", "{model} --question 'x y' --route weights --max-new-tokens 100000", RANGE),
    # ---------------------------------------------------------------- serve
    C("serve", "number: huge", "{model} --port 70000", RANGE, guard=SERVE_GUARD),
    C("serve", "number: negative", "{model} --port -1", RANGE, guard=SERVE_GUARD),
    C("serve", "number: zero", "{model} --stats-tokens 0 --state {out}", RANGE, guard=SERVE_GUARD),
    C("serve", "usage: unsafe host", "{model} --host 0.0.0.0 --state {out}", "refusing to listen on 0.0.0.0",
      guard=SERVE_GUARD),
    C("serve", "path: missing", "{model} --atlas {tmp}/no-atlas --state {out}", MISSING, guard=SERVE_GUARD),
    C("serve", "path: unrelated", "{model} --atlas {tb}/data --state {out}", "is not an atlas", guard=SERVE_GUARD),
    C("serve", "path: missing", "{model} --cases {tmp}/no-cases.json --state {out}", MISSING, guard=SERVE_GUARD),
    C("serve", "data: bad JSON", "{model} --cases {f:bad.json} --state {out}", "is not valid JSON",
      guard=SERVE_GUARD),
    C("serve", "data: missing field", "{model} --cases {f:counterfact_missing.json} --state {out}",
      "CounterFact record 2 lacks the field 'requested_rewrite.subject'", guard=SERVE_GUARD),
    C("serve", "path: unrelated", "{model} --state {f:corpus.txt}", "is a file", guard=SERVE_GUARD),
    C("serve", "path: missing", "{tmp}/no-model --state {out}", "not found", guard=SERVE_GUARD),
    C("serve", "out: unrelated folder", "{model} --state {keep}", "is not an ffkv serve state folder",
      guard=SERVE_GUARD),
    # ---------------------------------------------------------------- the machine refuses the final write
    C("testbed world", "fault: disk full", "--preset tiny --out {out}", "no space left on the device", fault="ENOSPC"),
    C("testbed world", "fault: read-only folder", "--preset tiny --out {out}", "read-only file system", fault="EROFS"),
    C("atlas merge", "fault: disk full", "{out} {f:atlas} {f:atlas_b}", "no space left on the device", fault="ENOSPC"),
    C("atlas mine", "fault: disk full", "{model} --corpus {f:corpus.txt} --out {out}",
      "no space left on the device", fault="ENOSPC"),
    # ---------------------------------------------------------------- demo
    C("demo", "number: zero", "--out {out} --cases 0", RANGE, guard=("ffkv.demo._run",)),
    C("demo", "number: negative", "--out {out} --cases -1", RANGE, guard=("ffkv.demo._run",)),
    C("demo", "number: huge", "--out {out} --cases 1000000000", RANGE, guard=("ffkv.demo._run",)),
    C("demo", "out: unrelated folder", "--out {keep} --cases 1", "is a non-empty folder that is not an ffkv", guard=("ffkv.demo._run",)),
]


# ------------------------------------------------------------------------------------------------ inputs
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _copy_model(tb: Path, dest: Path) -> Path:
    shutil.copytree(tb / "model", dest)
    return dest


class _Inputs:
    """The bad files and models of the table, made once per session on first use (``{f:NAME}``, ``{m:NAME}``)."""

    def __init__(self, root: Path, tb: Path):
        self.root, self.tb, self._made = root, tb, {}

    def get(self, kind: str, name: str) -> Path:
        key = f"{kind}:{name}"
        if key not in self._made:
            self._made[key] = getattr(self, f"_{kind}_" + re.sub(r"\W", "_", name))(self.root / kind / name)
        return self._made[key]

    # files
    def _facts(self, n=3):
        with open(self.tb / "data" / "facts.jsonl") as f:
            return [json.loads(next(f)) for _ in range(n)]

    def _f_corpus_txt(self, p):
        return _write(p, "Ana Boll was born in Paris.\n\nThe tower is in Rome. It is old.\n\n"
                         f"{SUBJECT} is a citizen of Peru.\n")

    def _f_corpus_bad_line_jsonl(self, p):
        return _write(p, '{"text": "Ana Boll was born in Paris."}\n{"text": "The tower\n{"text": "It is old."}\n')

    def _f_empty_txt(self, p):
        return _write(p, "")

    def _f_bad_json(self, p):
        return _write(p, '{"oops": ')

    def _f_facts_bad_line_jsonl(self, p):
        lines = [json.dumps(f) for f in self._facts()]
        lines[2] = lines[2][: len(lines[2]) // 2]
        return _write(p, "\n".join(lines) + "\n")

    def _f_facts_missing_jsonl(self, p):
        facts = self._facts()
        del facts[1]["object"]
        return _write(p, "".join(json.dumps(f) + "\n" for f in facts))

    def _f_counterfact_missing_json(self, p):
        cases = json.loads((self.tb / "data" / "counterfact.json").read_text())[:2]
        del cases[1]["requested_rewrite"]["subject"]
        return _write(p, json.dumps(cases))

    def _f_counterfact_bad_line_jsonl(self, p):
        cases = json.loads((self.tb / "data" / "counterfact.json").read_text())[:2]
        return _write(p, json.dumps(cases[0]) + "\n" + json.dumps(cases[1])[:40] + "\n")

    def _f_known_missing_json(self, p):
        known = json.loads((self.tb / "data" / "known_facts.json").read_text())[:2]
        del known[1]["subject"]
        return _write(p, json.dumps(known))

    def _f_requests_json(self, p):
        return _write(p, json.dumps([{"prompt": "{} is a citizen of", "subject": SUBJECT, "target": "Kenya",
                                      "target_true": "Peru"}]))

    def _f_requests_bad_line_jsonl(self, p):
        return _write(p, json.dumps({"prompt": "{} is a citizen of", "subject": SUBJECT, "target": "Kenya",
                                     "target_true": "Peru"}) + '\n{"prompt": "{} is\n')

    def _f_requests_missing_json(self, p):
        return _write(p, json.dumps([{"prompt": "{} is a citizen of", "subject": SUBJECT}]))

    def _f_journal_no_entries(self, p):
        """An edit folder whose journal.json lost its ``entries`` (issue 14, family 6)."""
        from ffkv.edit.journal import Journal
        from ffkv.models.loading import load_model

        _copy_model(self.tb, p / "model")
        Journal().save(p / "journal", model=load_model(p / "model"))
        meta = json.loads((p / "journal" / "journal.json").read_text())
        del meta["entries"]
        _write(p / "journal" / "journal.json", json.dumps(meta))
        return p

    def _f_atlas_bad_meta(self, p):
        shutil.copytree(self.get("f", "atlas"), p)
        meta = json.loads((p / "atlas.json").read_text())
        meta["n_layers"] = "six"
        _write(p / "atlas.json", json.dumps(meta))
        return p

    def _f_atlas(self, p):
        from ffkv.memory.miner import mine
        from ffkv.models.loading import load_model

        mine(load_model(self.tb / "model"), self.get("f", "corpus.txt"), p, top_k=3, progress=False)
        return p

    def _f_atlas_b(self, p):  # a second shard of the same model, for atlas merge
        from ffkv.memory.miner import mine
        from ffkv.models.loading import load_model

        corpus = _write(self.root / "f" / "corpus_b.txt", "Quoux Kurte grew up speaking Dutch.\n\nIt is new.\n")
        mine(load_model(self.tb / "model"), corpus, p, top_k=3, progress=False)
        return p

    # models
    def _m_truncated(self, p):
        _copy_model(self.tb, p)
        w = p / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return p

    def _m_empty(self, p):
        _copy_model(self.tb, p)
        (p / "model.safetensors").write_bytes(b"")
        return p

    def _m_shape(self, p):
        _copy_model(self.tb, p)
        cfg = json.loads((p / "config.json").read_text())
        cfg["n_inner"] = 4 * (cfg.get("n_inner") or 4 * cfg["n_embd"])
        _write(p / "config.json", json.dumps(cfg))
        return p

    def _m_config(self, p):
        _copy_model(self.tb, p)
        _write(p / "config.json", '{"model_type": "gpt2", ')
        return p

    def _m_nan(self, p):
        from safetensors.torch import load_file, save_file

        _copy_model(self.tb, p)
        w = load_file(p / "model.safetensors")
        name = next(k for k in sorted(w) if "mlp" in k and k.endswith("weight"))
        w[name][0, 0] = float("nan")
        save_file(w, p / "model.safetensors", metadata={"format": "pt"})
        return p


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, default_testbed):
    return _Inputs(tmp_path_factory.mktemp("fault-inputs"), default_testbed)


# ------------------------------------------------------------------------------------------------ running
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([\w.]+))?\}")


def resolve(args: str, tmp: Path, tb: Path, inputs: _Inputs | None) -> tuple[list[str], list[Path]]:
    """The argv of a row, and the output paths it names (``{out}``, ``{keep}``, ``{atlas}``) to check."""
    checked: list[Path] = []

    def sub(m):
        name, arg = m.group(1), m.group(2)
        if name in ("f", "m"):
            return str(inputs.get(name, arg))
        if name == "model":
            return str(tb / "model")
        if name == "tb":
            return str(tb)
        if name == "tmp":
            return str(tmp)
        if name == "out":
            checked.append(tmp / "out")
            return str(tmp / "out")
        if name == "keep":  # an existing, unrelated, non-empty folder
            keep = tmp / "keep"
            if not keep.exists():
                _write(keep / "notes.txt", "not an ffkv output\n")
            checked.append(keep)
            return str(keep)
        if name == "atlas":  # a copy per row: a row must leave it byte-identical
            a = tmp / "atlas"
            if not a.exists():
                shutil.copytree(inputs.get("f", "atlas"), a)
            checked.append(a)
            return str(a)
        raise KeyError(name)

    argv = [_PLACEHOLDER.sub(sub, a) for a in shlex.split(args)]
    # "{out}.csv" names tmp/out.csv: check the path as written
    checked = sorted({Path(a) for a in argv if any(a.startswith(str(c)) for c in checked)} | set(checked))
    return argv, checked


def tree_digest(path: Path) -> str | None:
    """None for an absent path, else a digest of every file's relative name and bytes."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*")) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


class Reached(Exception):
    """The work a refusal must come before was started."""


def _fail_writes(monkeypatch, code: int) -> None:
    """Simulate a full disk (ENOSPC) or a read-only folder (EROFS) at the moment an output is moved into
    place: every ``os.replace`` / ``os.rename`` / ``Path.rename`` fails as the kernel would. (A real small file
    system needs root and a loop device; the rename is where every atomic write of ffkv.io ends.)"""
    def fail(src, dst, *a, **k):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", fail)
    monkeypatch.setattr(os, "rename", fail)
    monkeypatch.setattr(Path, "rename", lambda self, dst: fail(self, dst))
    monkeypatch.setattr(Path, "replace", lambda self, dst: fail(self, dst))


def run_in_process(argv, guards, monkeypatch, capsys, fault=None):
    """``(exit code, stdout, stderr, traceback or None)`` of ``ffkv ARGV`` run by ffkv.cli.main in this process."""
    for g in guards:
        def stub(*a, _g=g, **k):
            raise Reached(f"accepted: the bad input reached {_g}")

        monkeypatch.setattr(g, stub)
    if fault is not None:
        _fail_writes(monkeypatch, getattr(errno, fault))
    capsys.readouterr()
    code, tb = None, None
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # noqa: BLE001 - what the suite looks for: a traceback the user would see
        tb = traceback.format_exc()
    cap = capsys.readouterr()
    return code, cap.out, cap.err, tb


def run_subprocess(argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "ffkv.cli", *argv], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300)
    tb = p.stderr if "Traceback (most recent call last)" in p.stderr else None
    return p.returncode, p.stdout, p.stderr, tb


def case_id(c: Case, seen=collections.Counter()) -> str:
    base = f"{c.command or 'ffkv'}|{c.kind}".replace(" ", "_")
    seen[base] += 1
    return base if seen[base] == 1 else f"{base}#{seen[base]}"


IDS = [case_id(c) for c in CASES]


def _params():
    for c, i in zip(CASES, IDS):
        yield pytest.param(c, id=i)


@pytest.mark.parametrize("case", list(_params()))
def test_fault(case: Case, default_testbed, inputs, tmp_path, monkeypatch, capsys):
    tmp = tmp_path / "w"
    tmp.mkdir()
    monkeypatch.chdir(tmp)  # a default output path (ffkv serve --state ffkv-serve) lands here, and is seen
    argv, checked = resolve(case.args, tmp, default_testbed, inputs)
    argv = [*case.command.split(), *argv]
    before = {p: tree_digest(p) for p in checked}
    listing = sorted(os.listdir(tmp))
    if case.proc:
        code, out, err, tb = run_subprocess(argv, tmp)
    else:
        code, out, err, tb = run_in_process(argv, case.guard, monkeypatch, capsys, case.fault)
    lines = [l for l in err.splitlines() if l.strip()]
    if os.environ.get("FFKV_FAULTS_LOG"):  # to read every row's line while writing the table
        with open(os.environ["FFKV_FAULTS_LOG"], "a") as f:
            f.write(json.dumps([case.command, case.kind, case.args[:60], code, lines[-2:], bool(tb)]) + "\n")
    assert tb is None, f"traceback:\n{tb}"
    assert code == 2, (code, lines[-3:], out[-300:])
    assert len(lines) == 1 and lines[0].startswith("ffkv: error: "), lines
    assert "\n" not in lines[0] and lines[0].endswith("."), lines[0]
    if case.expect:
        assert case.expect in lines[0], lines[0]
    for p in checked:
        assert tree_digest(p) == before[p], f"{p} changed"
    assert sorted(os.listdir(tmp)) == listing, "something was written beside the output"


# ------------------------------------------------------------------------------------------------ coverage
def command_paths() -> list[str]:
    """Every ffkv command as typed ("atlas mine"), groups included, from the CLI itself."""
    ctx = click.Context(cli)
    out = []

    def walk(cmd, path):
        out.append(" ".join(path))
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])

    walk(cli, [])
    return out


def test_every_command_is_in_the_table():
    covered = {c.command for c in CASES}
    missing = [p for p in command_paths() if p not in covered]
    assert not missing, f"commands with no fault case: {missing}"


def _command(path: str):
    ctx = click.Context(cli)
    cmd = cli
    for name in path.split():
        cmd = cmd.get_command(ctx, name)
    return cmd


def test_every_numeric_option_is_validated_with_its_range_in_help():
    """Every number of every command goes through ffkv.validate, integers with an upper bound, and --help
    states the range."""
    checked = 0
    for path in command_paths():
        cmd = _command(path)
        if isinstance(cmd, click.Group):
            continue
        ctx = click.Context(cmd, info_name=path)
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.is_flag:
                continue
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)):
                checked += 1
                assert isinstance(p.type, (validate.IntRange, validate.FloatRange)), (path, p.opts, p.type)
                if isinstance(p.type, validate.IntRange):
                    assert p.type.max is not None, (path, p.opts, "no upper bound: add it to validate.LIMITS")
                    help_text = p.get_help_record(ctx)[1]
                    assert f"x<={p.type.max}" in help_text, (path, p.opts, help_text)
    assert checked >= 60, checked


def test_validate_integer_and_number_state_the_range():
    from ffkv.errors import FfkvError

    with pytest.raises(FfkvError, match=r"--samples 0 is out of range\. Use an integer in 1\.\.10\.$"):
        validate.integer("0", "--samples", 1, 10)
    with pytest.raises(FfkvError, match=r"must be an integer, got '2\.5'"):
        validate.integer("2.5", "--top-k", 1)
    with pytest.raises(FfkvError, match=r"--share 0 is out of range\. Use a finite number in \(0, 1\]"):
        validate.number("0", "--share", 0, 1, lo_open=True)
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(FfkvError, match="finite"):
            validate.number(bad, "--temperature", 0)
    assert validate.number("1", "--share", 0, 1, lo_open=True) == 1.0


def test_records_name_the_offending_record(tmp_path):
    from ffkv.errors import FfkvError

    p = _write(tmp_path / "r.jsonl", '{"a": 1, "b": {"c": 2}}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(FfkvError, match=r"r\.jsonl line 4 is not valid JSON"):
        validate.records(p)
    _write(p, '{"a": 1, "b": {"c": 2}}\n\n{"a": 2, "b": {}}\n')
    with pytest.raises(FfkvError, match=r"r\.jsonl line 3 lacks the field 'b\.c'"):
        validate.records(p, ("a", "b.c"))
    assert validate.records(p, ("a",)) == [{"a": 1, "b": {"c": 2}}, {"a": 2, "b": {}}]
    q = _write(tmp_path / "r.json", json.dumps([{"a": 1}, 3]))
    with pytest.raises(FfkvError, match=r"r\.json case 2 is a JSON int, not an object"):
        validate.records(q, what="case")


# ------------------------------------------------------------------------------------------------ the doc
def _shown(args: str) -> str:
    def sub(m):
        name, arg = m.group(1), m.group(2)
        return {"model": "MODEL", "tb": "TESTBED", "tmp": "DIR", "out": "OUT", "keep": "NONEMPTY_DIR",
                "atlas": "ATLAS", "f": arg, "m": f"{arg}_model"}.get(name, name.upper())

    args = args.replace(EDIT, "EDIT").replace(LONG.replace(SUBJECT, "{}", 1), "<300 tokens>")
    text = _PLACEHOLDER.sub(sub, args.replace(LONG, "<300 tokens>"))
    return text.replace("|", "\\|")


def render_doc() -> str:
    n_cmd = len({c.command for c in CASES})
    lines = [
        "# What ffkv refuses, and how",
        "",
        "Generated from the case table of `tests/test_faults.py` (`python tests/test_faults.py > docs/faults.md`);",
        "a test keeps this file equal to the table, and the suite runs every row in CI. Every row asserts: exit",
        "code 2, exactly one line on stderr, `ffkv: error: <problem>. <fix>.`, no traceback, and the output path",
        "unchanged (absent, or byte-identical, with nothing new beside it). `python tests/test_faults.py --run`",
        "prints the counts. In the arguments, EDIT stands for `" + EDIT + "`.",
        "",
        f"{len(CASES)} cases over {n_cmd} commands.",
        "",
        "| command | bad input | arguments | the line contains |",
        "|---|---|---|---|",
    ]
    for c in CASES:
        said = f"`{_shown(c.expect)}`" if c.expect else ""
        args = _shown(c.args)
        if len(args) > 100:
            args = args[:97] + "..."
        cmd = f"`ffkv {c.command}`" if c.command else "`ffkv`"
        lines.append(f"| {cmd} | {c.kind} | `{args}` | {said} |")
    lines += ["", "## Numeric ranges", "",
              "Every numeric option of every command is checked by `ffkv.validate` (`IntRange`, `FloatRange`: "
              "non-finite numbers are refused) and its range is shown in `--help`. Options that state no upper bound "
              "of their own get one from `ffkv.validate.LIMITS`:", "",
              "| option | lowest | highest |", "|---|---|---|"]
    for opt, (lo, hi) in LIMITS_SORTED():
        low = "the command's" if lo is None else lo
        lines.append(f"| `{opt}` | {low} | {hi} |")
    return "\n".join(lines) + "\n"


def LIMITS_SORTED():
    return sorted(validate.LIMITS.items())


def test_docs_faults_is_the_generated_table():
    assert DOC.read_text() == render_doc(), "docs/faults.md is stale: run python tests/test_faults.py > docs/faults.md"


def test_case_table_is_well_formed():
    assert len(set(IDS)) == len(IDS)
    for c in CASES:
        assert c.expect, c  # every row says what its line contains
        assert c.kind.split(":")[0] in ("usage", "number", "prompt", "path", "hparams", "set", "layer", "data",
                                         "out", "model", "device", "fault"), c.kind


# ------------------------------------------------------------------------------------------------ counts
class _Counts:
    def __init__(self):
        self.outcome: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if "test_fault[" not in report.nodeid:
            return
        if report.when == "call" or report.outcome != "passed":
            self.outcome[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else report.outcome


if __name__ == "__main__":
    if "--run" not in sys.argv:
        sys.stdout.write(render_doc())
        sys.exit(0)
    counts = _Counts()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", __file__, "-k", "test_fault"], plugins=[counts])
    tally = collections.Counter(counts.outcome.values())
    print(f"fault suite: {len(CASES)} cases, {tally['passed']} passed, {tally['failed']} failed")
    sys.exit(rc)


# ------------------------------------------------------------------------------------------------ --out formats
def test_evaluate_out_writes_the_format_its_extension_names(tmp_path):
    """``ffkv evaluate --out`` (issue 14: a .csv file held Parquet bytes): each extension its own format,
    anything else refused before any work."""
    import csv

    import pyarrow.parquet as pq

    from ffkv.errors import FfkvError
    from ffkv.evaluate.cli import ROW_FORMATS, check_out, write_rows
    from ffkv.evaluate.run import EvalResult

    rows = [{"case_id": 0, "subject": "Ana Boll", "post_ES": 1.0, "post_generations": ["a, b", "c"]},
            {"case_id": 1, "subject": "Quoux Kurte", "post_ES": 0.0, "post_generations": []}]
    res = EvalResult(rows=rows, summary={}, meta={"provenance": {"hyperparameters": {"v_lr": 0.5}}})
    for ext in ROW_FORMATS:
        out = write_rows(res, tmp_path / f"rows{ext}")
        check_out(str(out), sequential=False)
        raw = out.read_bytes()
        if ext == ".parquet":
            assert raw[:4] == b"PAR1" and pq.read_table(out).column("subject").to_pylist() == ["Ana Boll",
                                                                                               "Quoux Kurte"]
        elif ext == ".json":
            assert [r["case_id"] for r in json.loads(raw)["rows"]] == [0, 1]
        elif ext == ".jsonl":
            got = [json.loads(l) for l in raw.decode().splitlines()]
            assert [r["subject"] for r in got] == ["Ana Boll", "Quoux Kurte"] and got[0]["post_generations"] == \
                ["a, b", "c"]
        else:
            assert not raw.startswith(b"PAR1")
            got = list(csv.DictReader(raw.decode().splitlines()))
            assert [r["subject"] for r in got] == ["Ana Boll", "Quoux Kurte"]
            assert json.loads(got[0]["post_generations"]) == ["a, b", "c"] and float(got[0]["post_ES"]) == 1.0
        if ext in (".csv", ".jsonl"):  # the provenance beside the rows
            meta = json.loads((tmp_path / f"rows{ext}.meta.json").read_text())
            assert meta["provenance"]["hyperparameters"] == {"v_lr": 0.5}
    for bad in ("rows.txt", "rows", "rows.CSV"):
        with pytest.raises(FfkvError, match="unknown format"):
            check_out(str(tmp_path / bad), sequential=False)
    with pytest.raises(FfkvError, match="--sequential writes a folder"):
        check_out(str(tmp_path / "curves.csv"), sequential=True)
    check_out(str(tmp_path / "curves"), sequential=True)


def test_the_machine_refusing_a_write_is_one_line_and_a_bug_keeps_its_traceback():
    from ffkv.cli import os_error_line

    assert os_error_line(OSError(errno.ENOSPC, "No space left on device", "/d/out.parquet")) == \
        "no space left on the device writing /d/out.parquet. Free some space, or write to another --out."
    assert os_error_line(OSError(errno.EROFS, "Read-only file system")).startswith("the file system is read-only.")
    assert os_error_line(OSError(errno.ENOENT, "No such file or directory", "x")) is None  # a bug: re-raised


def test_a_non_finite_result_is_refused_before_it_is_written(default_testbed, tmp_path, monkeypatch):
    """An overflow inside a computation (finite weights, NaN result) is refused in one line, nothing written."""
    import numpy as np

    import ffkv.locate.cli as lc
    from ffkv.cli import main

    real = lc.causal_traces

    def nan_traces(*a, **k):
        out = real(*a, **k)
        for r in out.values():
            r.scores = np.full_like(r.scores, np.nan)
        return out

    monkeypatch.setattr(lc, "causal_traces", nan_traces)
    out = tmp_path / "trace"
    with pytest.raises(SystemExit) as e:
        main(["trace", str(default_testbed / "model"), "--prompt", "The native language of Quoux Kurte is",
              "--subject", "Quoux Kurte", "--samples", "1", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
