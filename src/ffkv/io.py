"""Result files and output folders that are written whole or not at all, and say what made them.

Every result ffkv writes (JSON, Parquet, safetensors, model folders, atlases, edited models with their
journal) is first written under a temporary name *beside* its target (same folder, so same file system)
and moved in with one rename, so a run that fails, is interrupted or is killed at any moment leaves either
the old output or the new one, whole. Every result carries :func:`provenance`: the ffkv version, the
model's identity and the hyperparameters.

Output folders (:func:`output_dir`, the one mechanism every command that writes a folder uses):

    with output_dir(out, "edit", manifest=("journal/journal.json",)) as tmp:   # tmp: an empty folder beside out
        write(tmp / "model"); write(tmp / "journal")                       # nothing is at out yet
    # out is now the new folder; an old edit output there was replaced in the same rename

- the temporary is ``.<name>.ffkv-tmp.<pid>.<random>`` beside ``out``; the new folder replaces an existing
  one by an atomic exchange of the two (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere: old renamed aside,
  new renamed in, and a run that dies between the two is repaired by the next one), then the old is deleted;
- temporaries are removed on every exit path (an exception, KeyboardInterrupt, SIGTERM: while an output is
  written a default SIGTERM handler is replaced by one that raises :class:`SystemExit`); a SIGKILLed run's
  temporaries are recognised by the pid they record (``.ffkv-pid`` inside, and in the name) and removed by the
  next write of the same target (:func:`clean_stale`);
- an existing non-empty folder that is not the command's own kind of output (its ``.ffkv-output`` marker, or
  one of the ``manifest`` files, e.g. ``atlas.json``, ``journal/journal.json``) is refused in one line
  (:func:`check_output_target`), so ``--out`` never writes into a model folder or a home directory;
- the target is locked while it is written (:func:`lock_output`: ``fcntl.flock`` on ``.<name>.ffkv-lock``
  beside it, non-blocking, removed on release); a second writer is refused in one line naming the first's pid;
- ``OSError`` EROFS / EACCES / EPERM / ENOSPC / EDQUOT while writing becomes one :class:`FfkvError` line
  (:func:`writing`), with the target left as it was.

:func:`require_finite` refuses a NaN or infinite result before it is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno as _errno
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

try:  # POSIX; on other systems folders are written without a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from ._version import __version__
from .errors import FfkvError

__all__ = ["provenance", "atomic_path", "output_dir", "lock_output", "check_output_target", "is_output",
           "clean_stale", "writing", "require_finite", "write_json", "write_text", "read_json", "write_parquet",
           "read_parquet_meta", "save_safetensors", "load_safetensors", "OUTPUT_MARKER", "PAUSE_ENV"]

OUTPUT_MARKER = ".ffkv-output"  # {"kind": ..., "ffkv_version": ...} in every folder output_dir writes
PID_FILE = ".ffkv-pid"  # inside a temporary: the pid of the process writing it
# Test hook: when set to a path, the final rename of every output waits (up to 120 s) after touching that file
# (its text is the temporary's path), so a test can kill the process at the last moment of a write.
PAUSE_ENV = "FFKV_TEST_PAUSE_AT_COMMIT"

_TMP, _OLD, _LOCK = ".ffkv-tmp.", ".ffkv-old.", ".ffkv-lock"
_ACTIVE: set[str] = set()  # temporaries this process is writing now (never stale)
_WRITE_ERRNOS = {_errno.EROFS, _errno.ENOSPC, _errno.EDQUOT, _errno.EACCES, _errno.EPERM}


def provenance(model_identity: dict | None = None, **hyperparameters: Any) -> dict:
    """The record every result file carries: ffkv version, model identity, hyperparameters, time."""
    return {
        "ffkv_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_identity or {},
        "hyperparameters": _jsonable(hyperparameters),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


# ------------------------------------------------------------------------------------------ finite results
def require_finite(name: str, value: Any) -> Any:
    """Return ``value`` if every number in it is finite, else raise one FfkvError naming ``name``.

    value: a torch tensor, a numpy array, a float, a pyarrow Table / Array, or a dict / list / tuple of these
    (checked recursively; the offending key is named). Integers, strings and None always pass.
    """
    bad = _non_finite(value)
    if bad is not None:
        where, n_bad, n = bad
        label = f"{name}{where}"
        raise FfkvError(f"{label} is not finite ({n_bad} of {n} values are NaN or infinite); nothing was written",
                        "check the model's weights with `ffkv inspect`, or use smaller steps / learning rates")
    return value


def _non_finite(value: Any, where: str = "") -> tuple[str, int, int] | None:
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, 1, 1)
    if isinstance(value, dict):
        for k, v in value.items():
            bad = _non_finite(v, f"{where}[{k!r}]")
            if bad is not None:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            n_bad = sum(1 for v in value if isinstance(v, float) and not math.isfinite(v))
            return (where, n_bad, len(value)) if n_bad else None
        for i, v in enumerate(value):
            bad = _non_finite(v, f"{where}[{i}]")
            if bad is not None:
                return bad
        return None
    mod = type(value).__module__.split(".")[0]
    if mod == "torch":
        import torch

        if not (value.is_floating_point() or value.is_complex()):
            return None
        fin = torch.isfinite(value.detach())
        n_bad = int(fin.numel() - fin.sum())
        return (where, n_bad, fin.numel()) if n_bad else None
    if mod == "numpy":
        import numpy as np

        arr = np.asarray(value)
        if arr.dtype.kind not in "fc":
            return None
        n_bad = int(arr.size - np.isfinite(arr).sum())
        return (where, n_bad, arr.size) if n_bad else None
    if mod == "pyarrow":
        import numpy as np
        import pyarrow as pa

        if isinstance(value, (pa.Table, pa.RecordBatch)):
            for col in value.column_names:
                bad = _non_finite(value.column(col), f"{where}[{col!r}]")
                if bad is not None:
                    return bad
            return None
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            typ = value.type
            if pa.types.is_floating(typ):
                arr = value.to_numpy(zero_copy_only=False)
                arr = arr[~np.isnan(arr)] if value.null_count else arr  # nulls are missing values, not NaN
                n_bad = int(arr.size - np.isfinite(arr).sum())
                return (where, n_bad, len(value)) if n_bad else None
            if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
                flat = value.combine_chunks() if isinstance(value, pa.ChunkedArray) else value
                return _non_finite(flat.flatten(), where)
        return None
    return None


# -------------------------------------------------------------------------------------------- OS errors
def _write_error(e: OSError, path: Path) -> FfkvError | None:
    """The one-line error for an OSError met while writing ``path``, or None when it is not a write error of
    the target's file system (an unreadable *input* keeps its own error)."""
    if e.errno not in _WRITE_ERRNOS:
        return None
    if e.errno in (_errno.EACCES, _errno.EPERM) and e.filename is not None:
        try:
            Path(os.path.abspath(e.filename)).relative_to(os.path.abspath(path.parent))
        except ValueError:
            return None
    where = path.parent if path.parent != Path("") else Path(".")
    if e.errno == _errno.EROFS:
        return FfkvError(f"cannot write {path}: {where} is on a read-only file system; nothing was written",
                         "choose another --out on a writable disk")
    if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return FfkvError(f"cannot write {path}: no space left on the device of {where}"
                         + (" (quota exceeded)" if e.errno == _errno.EDQUOT else "") + "; nothing was written",
                         "free some space or choose another --out")
    return FfkvError(f"cannot write {path}: permission denied ({e.filename or where}); nothing was written",
                     "choose another --out, or make the folder writable")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a read-only file system, a full disk or a permission error met while writing ``path`` into one
    FfkvError line (every writer of this module runs inside it)."""
    path = Path(path)
    try:
        yield
    except OSError as e:
        err = _write_error(e, path)
        if err is None:
            raise
        raise err from None


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While an output is written, SIGTERM raises SystemExit(143) (when its handler is the default one), so the
    ``finally`` that removes the temporary runs; a handler somebody else installed is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, AttributeError):  # pragma: no cover - no SIGTERM on this platform
        yield
        return
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------- temporaries
def _norm(path: str | os.PathLike) -> Path:
    """``path`` as given, or absolute when its last part is empty, '.' or '..' (``--out .``): the temporary and
    the lock must go beside the target, in its parent, never inside it."""
    path = Path(path)
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path


def _stem(path: Path) -> str:
    return f".{path.name[:100]}"  # temporaries and locks beside ``path`` start with this


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_temp(path: Path, kind: str = _TMP) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f"{_stem(path)}{kind}{os.getpid()}.", dir=path.parent))
    _ACTIVE.add(str(tmp))
    # mkdtemp makes a private (0700) folder; the output it becomes gets the permissions mkdir would give it.
    os.chmod(tmp, 0o777 & ~_umask())
    (tmp / PID_FILE).write_text(f"{os.getpid()}\n")
    return tmp


def _temp_pid(tmp: Path) -> int | None:
    try:
        return int((tmp / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:  # the pid is in the name too: a run killed before it wrote the pid file
        return int(tmp.name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _is_stale(tmp: Path) -> bool:
    if str(tmp) in _ACTIVE:
        return False
    pid = _temp_pid(tmp)
    # A temporary of this very pid that this process is not writing was left by an earlier process that had
    # the same pid (pids restart in containers).
    return pid is None or pid == os.getpid() or not _alive(pid)


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed run left beside ``path`` (those whose process is gone); a folder that a
    run killed between its two renames set aside is put back when ``path`` is missing. Returns what was removed."""
    path = _norm(path)
    removed: list[Path] = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    stem = _stem(path)
    for p in siblings:
        name = p.name
        if not name.startswith(stem) or not (name.startswith(stem + _TMP) or name.startswith(stem + _OLD)):
            continue
        if not p.is_dir() or not _is_stale(p):
            continue
        if name.startswith(stem + _OLD) and not os.path.lexists(path):
            try:  # the only copy of the old output: put it back, never delete it
                os.rename(p, path)
            except OSError:
                pass
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _discard(tmp: Path) -> None:
    _ACTIVE.discard(str(tmp))
    if os.path.lexists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


def _pause_for_tests(tmp: Path) -> None:
    flag = os.environ.get(PAUSE_ENV)
    if not flag or _ACTIVE - {str(tmp)}:  # only the final write: not a file or folder inside another output
        return
    Path(flag).write_text(str(tmp))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and Path(flag).exists():
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ locks
@contextlib.contextmanager
def lock_output(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``path`` while the block runs (``fcntl.flock`` on the file
    ``.<name>.ffkv-lock`` beside it, non-blocking). A second writer gets one FfkvError:
    ``<path> is being written by another ffkv process (pid N). Wait for it or choose another --out.``
    Yields the lock file's path; the lock file is removed on release."""
    path = _norm(path)
    lock = path.parent / f"{_stem(path)}{_LOCK}"
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield lock
            return
        for _ in range(100):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                raise FfkvError(f"{path} is being written by another ffkv process (pid {holder})",
                                "wait for it or choose another --out") from None
            except OSError:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the previous holder removed the file between our open and our flock: retry
                break
            os.close(fd)
        else:  # pragma: no cover
            raise FfkvError(f"could not lock {path}", "try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        # Unlink while still holding the lock: a waiter that opened the old file sees a different inode and retries.
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


# --------------------------------------------------------------------------------------- output folders
def is_output(path: str | os.PathLike, kind: str | None = None, manifest: Sequence[str] | str = ()) -> bool:
    """Whether the folder ``path`` is an ffkv output of ``kind``: its ``.ffkv-output`` marker names the kind,
    or one of the ``manifest`` files (paths relative to it) exists."""
    path = Path(path)
    manifest = (manifest,) if isinstance(manifest, str) else tuple(manifest)
    marker = path / OUTPUT_MARKER
    if marker.is_file():
        try:
            if kind is None or json.loads(marker.read_text()).get("kind") == kind:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return any((path / m).exists() for m in manifest)


def check_output_target(path: str | os.PathLike, kind: str, manifest: Sequence[str] | str = (),
                        recognise: Callable[[Path], bool] | None = None) -> None:
    """Refuse to write the ``kind`` output at ``path`` when something else is there: a file, or a non-empty
    folder that is not an output of this kind (:func:`is_output`, or ``recognise(path)``)."""
    path = _norm(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise FfkvError(f"{path} exists and is not a folder", "choose another --out, or remove it")
    try:
        empty = not any(p for p in path.iterdir())
    except OSError as e:
        raise FfkvError(f"cannot read {path} ({e.strerror})", "choose another --out") from None
    if empty or is_output(path, kind, manifest) or (recognise is not None and recognise(path)):
        return
    what = ", ".join((OUTPUT_MARKER, *((manifest,) if isinstance(manifest, str) else manifest)))
    raise FfkvError(f"{path} is a non-empty folder that is not an ffkv {kind} output (it has none of {what}); "
                    f"nothing was written",
                    "choose another --out (an empty or new folder), or delete that folder first")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (_errno.EINVAL, _errno.ENOSYS, _errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_in(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path`` in one rename; an old ``path`` is swapped out and deleted."""
    (tmp / PID_FILE).unlink(missing_ok=True)
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):  # tmp now holds the old folder: discarded by the caller
        return
    old = Path(tempfile.mkdtemp(prefix=f"{_stem(path)}{_OLD}{os.getpid()}.", dir=path.parent))
    os.rmdir(old)
    _ACTIVE.add(str(old))
    try:
        os.rename(path, old)
        try:
            os.rename(tmp, path)  # a run killed just before this line: clean_stale puts ``old`` back
        except BaseException:
            os.rename(old, path)
            raise
        os.rename(old, tmp)
    finally:
        _ACTIVE.discard(str(old))


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, kind: str | None, manifest: Sequence[str] | str = (),
               recognise: Callable[[Path], bool] | None = None, mark: bool = True) -> Iterator[Path]:
    """Build the output folder ``path`` in a temporary folder beside it and move it in whole (module docstring).

    kind: what the command writes ("edit", "atlas", "testbed", ...): an existing non-empty folder at ``path``
    must be an output of that kind (its ``.ffkv-output`` marker, a ``manifest`` file, or ``recognise(path)``)
    or it is refused; None replaces whatever folder is there. The target is locked for the whole block; stale
    temporaries of a killed run are removed first. mark: write the ``.ffkv-output`` marker into the folder.
    Yields the empty temporary folder; on an exception (KeyboardInterrupt and SIGTERM included) it is removed
    and ``path`` is left as it was.
    """
    path = _norm(path)
    with _sigterm_raises(), lock_output(path), writing(path):
        clean_stale(path)
        if kind is not None:
            check_output_target(path, kind, manifest, recognise)
        elif os.path.lexists(path) and not path.is_dir():
            raise FfkvError(f"{path} exists and is not a folder", "choose another --out, or remove it")
        tmp = _new_temp(path)
        try:
            yield tmp
            if mark:
                (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "ffkv_version": __version__}) + "\n")
            _pause_for_tests(tmp)
            _move_in(tmp, path)
        finally:
            _discard(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    ``is_dir=True`` is :func:`output_dir` with no kind (any old folder is replaced) and no marker. For a file,
    the yielded path lies in a temporary folder beside ``path`` and is moved in with ``os.replace``.
    """
    path = _norm(path)
    if is_dir:
        with output_dir(path, None, mark=False) as tmp:
            yield tmp
        return
    with _sigterm_raises(), writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        if path.is_dir() and not path.is_symlink():
            raise FfkvError(f"{path} is a folder", "give a file name")
        tmp = _new_temp(path)
        try:
            yield tmp / path.name
            _pause_for_tests(tmp)
            os.replace(tmp / path.name, path)
        finally:
            _discard(tmp)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=indent) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FfkvError(f"file not found: {path}", "check the path")
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FfkvError(f"{path} is not valid JSON ({e})", "regenerate or replace the file") from None


def write_parquet(path: str | os.PathLike, table_or_columns: Any, meta: dict | None = None) -> Path:
    """Write a pyarrow Table (or a dict of columns) atomically; ``meta`` goes into the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table_or_columns if isinstance(table_or_columns, pa.Table) else pa.table(table_or_columns)
    if meta is not None:
        existing = dict(table.schema.metadata or {})
        existing[b"ffkv"] = json.dumps(_jsonable(meta)).encode()
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet_meta(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(path).metadata or {}
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        raise FfkvError(f"{path} is not a readable Parquet file ({e})", "delete it and run again") from None
    return json.loads(md[b"ffkv"]) if b"ffkv" in md else {}


def save_safetensors(path: str | os.PathLike, tensors: dict, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    metadata = {"ffkv": json.dumps(_jsonable(meta or {}))}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return ``(tensors, ffkv_metadata)``; a corrupt file is one clear error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FfkvError(f"file not found: {path}", "check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ffkv", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise FfkvError(f"{path} is not a valid safetensors file ({e})", "delete it and recompute") from None
    return tensors, meta
