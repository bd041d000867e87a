"""Output folders are written whole or not at all (issue 14, families 7, 8, 9, 11, 12).

ffkv.io.output_dir: built in a temporary folder beside the target and renamed in; temporaries removed on every
exit path and a killed run's cleaned by the next; an unrelated non-empty folder refused; a second writer
refused while the first holds the lock; a read-only folder or a full disk is one line with the target unchanged.
Then the commands: ``ffkv edit`` (a model with its journal is one output, SIGKILL at the final write, failed
edits, tampered journals), ``ffkv testbed build/world``, ``ffkv demo``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ffkv import io
from ffkv.errors import FfkvError

REPO = Path(__file__).resolve().parents[1]
# The planted model is extreme (h ~ 200, p(paris) ~ 1 - 1e-15): large steps and updates (as tests/test_edit.py).
FAST = {"v_num_grad_steps": 10, "v_lr": 5.0, "prefixes": [[4, 3]], "stats_tokens": 3000, "max_update_ratio": 1000.0}


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what "unchanged" is compared on."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporaries, set-aside folders and lock files of ffkv in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".ffkv-tmp." in p.name or ".ffkv-old." in p.name
                  or p.name.endswith(".ffkv-lock"))


def run_cli(args, capsys) -> tuple[int, str, str]:
    """``ffkv ARGS`` in this process: (exit code, stdout, stderr)."""
    from ffkv.cli import main

    try:
        rc = main([str(a) for a in args]) or 0
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ffkv: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def spawn_cli(args, **env) -> subprocess.Popen:
    code = "import sys; from ffkv.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before its final write: "
                                 f"{proc.stderr.read()}")
        assert time.monotonic() - t0 < timeout, "the process never reached its final write"
        time.sleep(0.05)


# ============================================================================================ ffkv.io
def test_output_dir_moves_a_whole_folder_in_and_replaces_its_own_kind(tmp_path):
    out = tmp_path / "out"
    with io.output_dir(out, "thing", manifest="thing.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.ffkv-tmp.") and not out.exists()
        (tmp / "thing.json").write_text("1")
        (tmp / "part").write_text("a")
    assert listing(out) == {".ffkv-output": listing(out)[".ffkv-output"], "thing.json": b"1", "part": b"a"}
    assert json.loads((out / ".ffkv-output").read_text())["kind"] == "thing"
    with io.output_dir(out, "thing", manifest="thing.json") as tmp:
        (tmp / "thing.json").write_text("2")
    assert (out / "thing.json").read_text() == "2" and not (out / "part").exists()  # replaced, not merged
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~io._umask())  # not mkdtemp's private 0700


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_every_exit_path_removes_the_temporary_and_keeps_the_old_output(tmp_path, exc):
    out = tmp_path / "out"
    with io.output_dir(out, "thing") as tmp:
        (tmp / "v").write_text("old")
    before = listing(out)
    with pytest.raises(type(exc)):
        with io.output_dir(out, "thing") as tmp:
            (tmp / "v").write_text("new")
            raise exc
    assert listing(out) == before and leftovers(tmp_path) == []
    with pytest.raises(type(exc)):
        with io.output_dir(tmp_path / "fresh", "thing") as tmp:
            (tmp / "v").write_text("new")
            raise exc
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


_WRITER = """
import sys, time
from pathlib import Path
from ffkv import io
with io.output_dir(sys.argv[1], "thing") as tmp:
    (tmp / "v").write_text("new")
    Path(sys.argv[2]).write_text("inside")
    time.sleep(120)
"""


def test_sigterm_removes_the_temporary(tmp_path):
    out, flag = tmp_path / "out", tmp_path / "flag"
    with io.output_dir(out, "thing") as tmp:
        (tmp / "v").write_text("old")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(flag)], env=subprocess_env(),
                         stderr=subprocess.PIPE, text=True)
    wait_for(flag, p, 60)
    assert len([n for n in leftovers(tmp_path) if ".ffkv-tmp." in n]) == 1
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 143
    assert (out / "v").read_text() == "old" and leftovers(tmp_path) == []


def test_a_killed_runs_temporaries_are_recognised_and_cleaned(tmp_path):
    out, flag = tmp_path / "out", tmp_path / "flag"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(flag)], env=subprocess_env(),
                         stderr=subprocess.PIPE, text=True)
    wait_for(flag, p, 60)
    [tmp] = [tmp_path / n for n in leftovers(tmp_path) if ".ffkv-tmp." in n]
    assert int((tmp / io.PID_FILE).read_text()) == p.pid
    assert io.clean_stale(out) == [] and tmp.exists()  # its writer is alive: not stale
    p.kill()
    p.wait(60)
    assert tmp.exists() and not out.exists()  # SIGKILL runs no cleanup ...
    assert io.clean_stale(out) == [tmp] and not tmp.exists()  # ... the next run does
    # A temporary whose pid file names this very process, but which this process is not writing, is stale
    # too (pids are reused); the next write of the target removes it.
    orphan = tmp_path / f".out.ffkv-tmp.{os.getpid()}.x"
    orphan.mkdir()
    (orphan / io.PID_FILE).write_text(f"{os.getpid()}\n")
    with io.output_dir(out, "thing") as t:
        (t / "v").write_text("1")
    assert leftovers(tmp_path) == [] and (out / "v").read_text() == "1"


def test_without_an_atomic_exchange_a_kill_between_the_two_renames_is_repaired(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    for v in ("old", "new"):
        with io.output_dir(out, "thing") as tmp:
            (tmp / "v").write_text(v)
    assert (out / "v").read_text() == "new" and leftovers(tmp_path) == []
    # A run killed after setting the old folder aside and before renaming the new one in:
    aside = tmp_path / ".out.ffkv-old.999999999.abc"
    out.rename(aside)
    with io.output_dir(out, "thing") as tmp:
        assert (out / "v").read_text() == "new"  # the old folder is back before anything else happens
        (tmp / "v").write_text("newer")
    assert (out / "v").read_text() == "newer" and leftovers(tmp_path) == []


def test_out_dot_builds_beside_the_folder_not_inside(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with io.output_dir(".", "thing") as tmp:
        assert tmp.parent == tmp_path
        (tmp / "v").write_text("1")
    assert (tmp_path / "here" / "v").read_text() == "1" and leftovers(tmp_path) == []


def test_an_unrelated_non_empty_folder_or_a_file_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(FfkvError, match="not an ffkv atlas output") as e:
        with io.output_dir(home, "atlas", manifest="atlas.json"):
            raise AssertionError("the block must not run")
    assert "\n" not in str(e.value) and listing(home) == {"notes.txt": b"precious"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(FfkvError, match="is not a folder"):
        with io.output_dir(tmp_path / "file", "atlas"):
            pass
    # its own kind (by manifest or by marker) and an empty folder are fine
    (home / "atlas.json").write_text("{}")
    with io.output_dir(home, "atlas", manifest="atlas.json") as tmp:
        (tmp / "atlas.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    with io.output_dir(tmp_path / "empty", "atlas"):
        pass
    with pytest.raises(FfkvError, match="not an ffkv edit output"):  # the marker names another kind
        with io.output_dir(tmp_path / "empty", "edit"):
            pass
    assert leftovers(tmp_path) == []


def test_a_second_writer_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    with io.output_dir(out, "thing") as tmp:
        (tmp / "v").write_text("first")
        with pytest.raises(FfkvError) as e:
            with io.output_dir(out, "thing"):
                raise AssertionError("the block must not run")
    assert str(e.value) == (f"{out} is being written by another ffkv process (pid {os.getpid()}). "
                            f"Wait for it or choose another --out.")
    assert (out / "v").read_text() == "first" and leftovers(tmp_path) == []  # the lock file goes too


def test_two_concurrent_cli_writers(tmp_path, capsys):
    out, flag = tmp_path / "world", tmp_path / "flag"
    first = spawn_cli(["testbed", "world", "--preset", "tiny", "--out", out], **{io.PAUSE_ENV: str(flag)})
    wait_for(flag, first)  # the first holds out's lock, at its final rename
    rc, _, err = run_cli(["testbed", "world", "--preset", "tiny", "--out", out], capsys)
    assert rc == 2
    assert err.strip() == (f"ffkv: error: {out} is being written by another ffkv process (pid {first.pid}). "
                           f"Wait for it or choose another --out.")
    flag.unlink()  # let the first one finish
    stdout, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert json.loads(stdout)["facts"] == str(out / "facts.jsonl") and (out / "facts.jsonl").exists()
    assert leftovers(tmp_path) == []


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: chmod, or (as root, where chmod does not stop writes) every attempt to create
    something in it fails with EROFS, as on a read-only mount."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real_open, real_mkdir, real_mkdtemp = os.open, os.mkdir, io.tempfile.mkdtemp

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).parent == folder

    def rofs(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "open", lambda p, *a, **k: rofs(p) if inside(p) else real_open(p, *a, **k))
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: rofs(p) if inside(p) else real_mkdir(p, *a, **k))
    monkeypatch.setattr(io.tempfile, "mkdtemp",
                        lambda *a, dir=None, **k: rofs(dir) if dir is not None and Path(dir) == folder
                        else real_mkdtemp(*a, dir=dir, **k))


def test_a_read_only_folder_is_one_line_and_nothing_changes(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    with io.output_dir(ro / "world", "world") as tmp:
        (tmp / "facts.jsonl").write_text("old\n")
    read_only(monkeypatch, ro)
    try:
        rc, _, err = run_cli(["testbed", "world", "--preset", "tiny", "--out", ro / "world"], capsys)
        line = one_error_line(err)
        assert rc == 2 and "cannot write" in line and "nothing was written" in line
        assert ("read-only" in line) if os.geteuid() == 0 else ("permission denied" in line)
        with pytest.raises(FfkvError, match="cannot write"):
            io.write_json(ro / "x.json", {"a": 1})
    finally:
        ro.chmod(0o755)
    assert listing(ro) == {"world/facts.jsonl": b"old\n", "world/.ffkv-output": listing(ro)["world/.ffkv-output"]}


def test_a_full_disk_is_one_line_and_nothing_changes(tmp_path, monkeypatch, capsys):
    import ffkv.testbed.datasets as datasets

    out = tmp_path / "world"
    assert run_cli(["testbed", "world", "--preset", "tiny", "--out", out], capsys)[0] == 0
    before = listing(out)
    real = datasets.write_json

    def full(path, *a, **k):
        if Path(path).name == "known_facts.json":  # the disk fills up half-way through the folder
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *a, **k)

    monkeypatch.setattr(datasets, "write_json", full)
    rc, _, err = run_cli(["testbed", "world", "--preset", "tiny", "--seed", "3", "--out", out], capsys)
    line = one_error_line(err)
    assert rc == 2 and "no space left" in line and "nothing was written" in line
    assert listing(out) == before and leftovers(tmp_path) == []


def test_an_unreadable_input_keeps_its_own_error(tmp_path):
    # EACCES on a file outside the output is not the output's problem: it is not turned into "cannot write".
    with pytest.raises(PermissionError):
        with io.output_dir(tmp_path / "out", "thing"):
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/some-input")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_require_finite():
    import pyarrow as pa

    ok = {"a": [1.0, 2.0], "t": torch.ones(3), "n": np.zeros(2), "i": torch.arange(3), "s": "x", "none": None,
          "table": pa.table({"x": [1.0, None], "name": ["a", "b"]})}
    assert io.require_finite("result", ok) is ok
    for bad, where in ((torch.tensor([1.0, float("nan")]), "result"), ({"a": {"b": [1.0, float("inf")]}}, "['b']"),
                       (np.array([np.inf]), "result"), (float("nan"), "result"),
                       (pa.table({"score": [1.0, float("nan")]}), "['score']"),
                       ([torch.ones(2), torch.tensor([float("-inf")])], "[1]")):
        with pytest.raises(FfkvError, match="not finite") as e:
            io.require_finite("result", bad)
        assert where in str(e.value) and "nothing was written" in str(e.value)


# ============================================================================================ ffkv edit
@pytest.fixture(scope="module")
def edit_setup(tmp_path_factory):
    """A planted model folder, a corpus, hparams and a warm statistics cache."""
    from ffkv.testbed.planted import WORDS, planted_model, save_planted

    d = tmp_path_factory.mktemp("edit")
    src = save_planted(planted_model(), d / "planted")
    rng = random.Random(0)
    (d / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
                                              for _ in range(400)))
    (d / "hp.json").write_text(json.dumps(FAST))
    return d, src


@pytest.fixture(scope="module")
def edited(edit_setup, tmp_path_factory):
    """One ``ffkv edit`` output folder (tests copy it before changing it)."""
    from ffkv.cli import main

    out = tmp_path_factory.mktemp("edited") / "ed"
    assert (main([str(a) for a in edit_args(edit_setup, out)]) or 0) == 0
    return out


def edit_args(edit_setup, out, subject="tower", target=" rome", hparams=None):
    d, src = edit_setup
    return ["edit", src, "--method", "rome", "--prompt", "the old {}", "--subject", subject, "--target", target,
            "--layer", "1", "--hparams", hparams or d / "hp.json", "--corpus", d / "corpus.txt",
            "--stats-dir", d / "stats", "--out", out, "--quiet"]


def test_edit_writes_model_and_journal_as_one_output(edit_setup, tmp_path, monkeypatch, capsys):
    import ffkv.edit.api as api
    import ffkv.edit.cli as edit_cli
    from ffkv.edit import Journal

    out = tmp_path / "ed"
    rc, stdout, err = run_cli(edit_args(edit_setup, out) + ["--json"], capsys)
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["status"] == "edited" and res["probs"][0]["prob_after"] > res["probs"][0]["prob_before"]
    assert {"model/config.json", "model/model.safetensors", "model/ffkv_edit.json", "journal/journal.json",
            "journal/deltas.safetensors", "journal/base.safetensors", ".ffkv-output"} <= set(listing(out))
    assert len(Journal.load(out)) == 1 and leftovers(tmp_path) == []
    # an unrelated non-empty folder is refused, before the model is even loaded
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("keep")
    def no_load(*a, **k):
        raise AssertionError("refused before the model is loaded")

    monkeypatch.setattr(edit_cli, "load_model_from_options", no_load)
    monkeypatch.setattr(api, "load_model", no_load)
    for args in (edit_args(edit_setup, tmp_path / "docs"), ["edit", "undo", out, "--out", tmp_path / "docs"]):
        rc, _, err = run_cli(args, capsys)
        assert rc == 2 and "not an ffkv edit output" in one_error_line(err)
        assert listing(tmp_path / "docs") == {"a.txt": b"keep"}


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_at_the_final_write_of_ffkv_edit_leaves_old_or_nothing(edit_setup, edited, tmp_path, capsys,
                                                                      existing):
    from ffkv.edit import Journal
    from ffkv.edit.api import undo_folder

    out, flag = tmp_path / "ed", tmp_path / "flag"
    if existing:
        shutil.copytree(edited, out)
        before = listing(out)
    p = spawn_cli(edit_args(edit_setup, out, subject="castle", target=" paris"), **{io.PAUSE_ENV: str(flag)})
    wait_for(flag, p)
    tmp = Path(flag.read_text())
    # the new output is complete in its temporary: model and journal both, nothing of it at out yet
    assert (tmp / "model" / "model.safetensors").exists() and (tmp / "journal" / "journal.json").exists()
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    if existing:
        assert listing(out) == before  # the old output, whole: still undoable
        j = Journal.load(out)
        assert len(j) == 1 and j[0].requests[0]["subject"] == "tower"
        assert undo_folder(out, tmp_path / "undone")["undone"] == 1
    else:
        assert not out.exists()
    assert tmp.exists()  # SIGKILL left its temporary ...
    rc, _, err = run_cli(edit_args(edit_setup, out, subject="castle", target=" paris"), capsys)
    assert rc == 0, err
    assert not tmp.exists() and leftovers(tmp_path) == []  # ... which the next edit of out removed
    assert Journal.load(out)[0].requests[0]["subject"] == "castle"


def test_a_failed_edit_writes_nothing(edit_setup, tmp_path, capsys):
    # v_lr = 0: the value is not moved, so the target does not become more likely: not an "edit"
    hp = tmp_path / "hp0.json"
    hp.write_text(json.dumps({**FAST, "v_lr": 0.0}))
    out = tmp_path / "ed"
    rc, _, err = run_cli(edit_args(edit_setup, out, hparams=hp), capsys)
    line = one_error_line(err)
    assert rc == 2 and "the edit failed" in line and "did not become more likely" in line
    assert not out.exists() and leftovers(tmp_path) == []
    rc, stdout, err = run_cli(edit_args(edit_setup, out, hparams=hp) + ["--json"], capsys)
    res = json.loads(stdout)
    assert rc == 2 and res["status"] == "failed" and res["out"] is None and "more likely" in res["error"]
    assert one_error_line(err) == f"ffkv: error: {res['error']}"
    assert res["probs"][0]["prob_after"] <= res["probs"][0]["prob_before"]
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_fault_while_writing_an_edit_keeps_the_old_output(edit_setup, edited, tmp_path, monkeypatch, capsys):
    import ffkv.edit.journal as journal_mod

    out = tmp_path / "ed"
    shutil.copytree(edited, out)
    before = listing(out)

    def full(*a, **k):  # the disk fills up after the model was written, while the journal is
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_mod, "_save_tensors", full)
    rc, _, err = run_cli(edit_args(edit_setup, out, subject="castle", target=" paris"), capsys)
    assert rc == 2 and "no space left" in one_error_line(err)
    assert listing(out) == before and leftovers(tmp_path) == []


def test_undo_in_place_replaces_the_folder_whole(edited, tmp_path, capsys):
    from ffkv.edit import Journal

    out = tmp_path / "ed"
    shutil.copytree(edited, out)
    rc, _, err = run_cli(["edit", "undo", out, "--out", out], capsys)
    assert rc == 0, err
    assert len(Journal.load(out)) == 0 and leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["ed"]


def test_non_finite_weights_are_not_written(tmp_path):
    from ffkv.edit import Journal, save_edited
    from ffkv.testbed.planted import planted_model

    model = planted_model().model
    j = Journal()
    u, v = torch.zeros(model.d_model, 1), torch.zeros(model.values(1).shape[1], 1)
    j.record(model, "rome", 1, u, v, [], {})
    with torch.no_grad():
        model.values(1)[0, 0] = float("nan")
    with pytest.raises(FfkvError, match="W_out of layer 1 is not finite"):
        save_edited(model, j, tmp_path / "ed")
    assert list(tmp_path.iterdir()) == []


def _tamper(meta: dict, how: str) -> dict:
    if how == "no entries":
        del meta["entries"]
    elif how == "no method":
        del meta["entries"][0]["method"]
    elif how == "string layer":
        meta["entries"][0]["layer"] = "1"
    elif how == "float layer":
        meta["entries"][0]["layer"] = 1.5
    elif how == "version":
        meta["journal_version"] = 99
    elif how == "entries not a list":
        meta["entries"] = {"0": meta["entries"][0]}
    elif how == "bad checksum":
        meta["entries"][0]["after"] = None
    elif how == "layer out of range":
        meta["entries"][0]["layer"] = 7
    return meta


@pytest.mark.parametrize("how", ["no entries", "no method", "string layer", "float layer", "version",
                                 "entries not a list", "bad checksum", "layer out of range", "not json", "array"])
def test_a_tampered_journal_is_refused_in_one_line(edited, tmp_path, capsys, how):
    out = tmp_path / "ed"
    shutil.copytree(edited, out)
    jp = out / "journal" / "journal.json"
    if how == "not json":
        jp.write_text(jp.read_text()[:40])
    elif how == "array":
        jp.write_text("[]")
    else:
        jp.write_text(json.dumps(_tamper(json.loads(jp.read_text()), how)))
    before = listing(out)
    rc, _, err = run_cli(["edit", "undo", out, "--out", tmp_path / "undone"], capsys)
    line = one_error_line(err)
    assert rc == 2, err
    assert {"version": "journal version 99", "not json": "not valid JSON",
            "layer out of range": "out of range"}.get(how, "not a valid ffkv journal") in line
    assert not (tmp_path / "undone").exists() and listing(out) == before


# ================================================================================== testbed and demo
def test_testbed_build_refuses_an_unrelated_folder(edit_setup, tmp_path, capsys):
    _, src = edit_setup
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    before = listing(model_dir)
    t0 = time.monotonic()
    rc, _, err = run_cli(["testbed", "build", "--preset", "tiny", "--out", model_dir], capsys)
    assert rc == 2 and "not an ffkv testbed output" in one_error_line(err)
    assert time.monotonic() - t0 < 30  # refused before any world is generated or model trained
    assert listing(model_dir) == before and leftovers(tmp_path) == []
    rc, _, err = run_cli(["testbed", "world", "--preset", "tiny", "--out", model_dir], capsys)
    assert rc == 2 and "not an ffkv world output" in one_error_line(err)
    assert listing(model_dir) == before


def test_testbed_build_is_written_whole(tmp_path, monkeypatch):
    import ffkv.testbed.train as train
    from ffkv.testbed.build import build

    def fails(*a, **k):
        raise FfkvError("training diverged", "lower the learning rate")

    monkeypatch.setattr(train, "train_model", fails)
    with pytest.raises(FfkvError, match="training diverged"):
        build("tiny", tmp_path / "tb", report=False, progress=False)
    assert list(tmp_path.iterdir()) == []  # the data sets written before the failure went with the temporary


def test_demo_with_bad_cases_leaves_nothing(tmp_path, capsys):
    rc, _, err = run_cli(["demo", "--cases", "0", "--out", tmp_path / "demo"], capsys)
    assert rc == 2 and "--cases" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_demo_leaves_nothing_and_keeps_an_old_demo(tmp_path, monkeypatch, capsys):
    import ffkv.demo as demo_mod

    calls = []

    def fake_run(args):
        calls.append(args[0])
        if len(calls) == 3:  # inspect and the testbed report went well, the atlas fails
            raise FfkvError("the corpus is empty", "pass a corpus with text")
        return "{}"

    monkeypatch.setattr(demo_mod, "_run", fake_run)
    out = tmp_path / "demo"
    rc, _, err = run_cli(["demo", "--out", out], capsys)
    assert rc == 2 and "the corpus is empty" in one_error_line(err) and calls == ["inspect", "testbed", "atlas"]
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an earlier demo's folder stays as it was
    (out / "summary.md").write_text("earlier")
    calls.clear()
    rc, _, err = run_cli(["demo", "--out", out], capsys)
    assert rc == 2 and listing(out) == {"summary.md": b"earlier"} and leftovers(tmp_path) == []
    # and a folder that is not a demo's is refused before any step
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("x")
    calls.clear()
    rc, _, err = run_cli(["demo", "--out", tmp_path / "other"], capsys)
    assert rc == 2 and "not an ffkv demo output" in one_error_line(err) and calls == []
