"""Several processes (``torchrun``): who this process is, and the few exact collectives ffkv needs.

ffkv runs one process per device; ``torchrun`` starts them and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``. :func:`world` reads them and joins the process group once, with the ``gloo`` backend: every
collective here moves CPU tensors (a few per command: the gathered trigger tables, the float64 sums of the
key statistics), so a model on CUDA needs no NCCL, and ranks on one GPU or none work alike. A process started
without them is rank 0 of 1: nothing is initialised and every collective below returns its input, so a
single process pays nothing.

The collectives are exact: :func:`all_gather_bytes` moves bytes (variable sizes: lengths first, then the
payloads padded to the longest), :func:`all_gather_arrays` numpy arrays through it (``np.save``, no pickle),
:func:`gather_bytes` / :func:`gather_arrays` the same to one rank only, and :func:`all_reduce_sum` sums in
float64 (counts below 2^53 stay exact). Which ranks hold what and how the results combine is the caller's
(the atlas miner, the key statistics): see ``docs/distributed.md``.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

__all__ = ["all_gather_arrays", "all_gather_bytes", "all_gather_json", "all_reduce_sum", "barrier", "close",
           "gather_arrays", "gather_bytes", "is_main", "local_device", "world"]


def _env_world() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def world() -> tuple[int, int]:
    """``(rank, world_size)``: from the process group when one is initialised, else from the torchrun
    environment, joining the group (once) when ``WORLD_SIZE`` > 1; ``(0, 1)`` for a lone process."""
    d = _dist()
    if d is not None:
        return d.get_rank(), d.get_world_size()
    rank, size = _env_world()
    if size <= 1:
        return 0, 1
    d = torch.distributed
    if not d.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    # gloo on GPU machines too: ffkv's collectives run a few times per command, on CPU tensors (the gathered
    # tables, the float64 sums), so one GPU per rank needs no NCCL communicator.
    d.init_process_group(backend="gloo")
    return d.get_rank(), d.get_world_size()


def close() -> None:
    """Leave the process group (if this process joined one): the end of a command run under torchrun."""
    d = _dist()
    if d is not None:
        d.destroy_process_group()


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes results)."""
    return world()[0] == 0


def local_device(device: str | None) -> str | None:
    """The device this rank should load its model on: ``"cuda"`` under torchrun means ``cuda:LOCAL_RANK`` (one
    GPU per process, made the current CUDA device too); anything else is returned as given."""
    if _env_world()[1] <= 1 or device is None or str(device) != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def barrier() -> None:
    """Wait until every rank reaches this point (a CPU all-reduce, so it never needs a CUDA stream)."""
    if world()[1] > 1:
        torch.distributed.all_reduce(torch.zeros(1, dtype=torch.int64))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The float64 sum over ranks of ``t`` (any shape; every rank passes the same shape), on the CPU (gloo).
    A lone process gets ``t`` in float64, where it was."""
    if world()[1] <= 1:
        return t.double().clone() if t.dtype != torch.float64 else t.clone()
    out = t.detach().to("cpu", torch.float64).clone()
    torch.distributed.all_reduce(out)
    return out


def _sized_buffer(data: bytes, size: int):
    """Every rank's payload length (all-gathered) and ``data`` in a uint8 buffer as long as the longest."""
    n = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    torch.distributed.all_gather(sizes, n)
    buf = torch.zeros(max(max(int(s) for s in sizes), 1), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return sizes, buf


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order, on every rank (exact; the sizes may differ)."""
    rank, size = world()
    if size <= 1:
        return [bytes(data)]
    sizes, buf = _sized_buffer(data, size)
    parts = [torch.zeros_like(buf) for _ in range(size)]
    torch.distributed.all_gather(parts, buf)
    return [p[: int(s)].numpy().tobytes() for p, s in zip(parts, sizes)]


def gather_bytes(data: bytes, dst: int = 0) -> list[bytes] | None:
    """Every rank's ``data`` in rank order on rank ``dst`` (None on the others): :func:`all_gather_bytes`
    without the copies on every rank, for large payloads that only one rank combines."""
    rank, size = world()
    if size <= 1:
        return [bytes(data)]
    sizes, buf = _sized_buffer(data, size)
    parts = [torch.zeros_like(buf) for _ in range(size)] if rank == dst else None
    torch.distributed.gather(buf, parts, dst=dst)
    return [p[: int(s)].numpy().tobytes() for p, s in zip(parts, sizes)] if rank == dst else None


def all_gather_json(obj) -> list:
    """Every rank's JSON-able ``obj``, in rank order."""
    return [json.loads(b.decode()) for b in all_gather_bytes(json.dumps(obj).encode())]


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def all_gather_arrays(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every rank's dict of numpy arrays (any sizes, numeric or fixed-width string dtypes), in rank order;
    values and dtypes exactly as sent."""
    return [_unpack(b) for b in all_gather_bytes(_pack(arrays))]


def gather_arrays(arrays: dict[str, np.ndarray], dst: int = 0) -> list[dict[str, np.ndarray]] | None:
    """Every rank's dict of numpy arrays in rank order on rank ``dst`` (None on the others), exactly as sent."""
    got = gather_bytes(_pack(arrays), dst)
    return None if got is None else [_unpack(b) for b in got]
