"""Vectors as lists of tensors, one per parameter block, each on its own device and in its own dtype.

Nothing here assumes one flat vector on one device: a model split across devices gives a vector whose
blocks live where their parameters live. Reductions (``dot``, ``norm``) accumulate in float64, because
float32 reductions over millions of entries lose about 1e-4 relative accuracy on CPU, enough to push a
Ritz value past the true largest eigenvalue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hess_utils import _memory, _threads

TensorList = list[torch.Tensor]

PROBE_KINDS = ("rademacher", "gaussian")


def _check_pair(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"vector lists have different lengths ({len(a)} vs {len(b)} blocks)")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            raise ValueError(f"block {i}: shapes differ ({tuple(x.shape)} vs {tuple(y.shape)})")


# On a CPU, a float64 copy of a multi-million-entry block costs more than the dot itself (allocation and
# page faults: 23 ms against 7 ms for the 5.3 M entries of the benchmark GPT-2); long blocks are converted a
# chunk of this many entries at a time into a small reused buffer instead. Accelerators convert in one go.
_DOT_CHUNK = 1 << 18  # 2 MiB float64 buffers: 5.9 ms per 5.3 M-entry dot against 7.7 ms at 1 << 16


def _block_dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``<x, y>`` of two same-shape blocks as a float64 scalar tensor on ``x``'s device, summed in float64."""
    x = x.reshape(-1)
    y = y.reshape(-1).to(x.device)
    n = x.numel()
    if x.device.type != "cpu" or n <= _DOT_CHUNK or (x.dtype == y.dtype == torch.float64):
        return torch.dot(x.to(torch.float64), y.to(torch.float64))
    return _ranges_dot64([x], [y], [(0, 0, n)])


def _ranges_dot64(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], share) -> torch.Tensor:
    """Float64 ``sum <a_i[start:stop], b_i[start:stop]>`` over one share of CPU ranges (own buffers)."""
    bx = torch.empty(_DOT_CHUNK, dtype=torch.float64)
    by = torch.empty(_DOT_CHUNK, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for i, start, stop in share:
        x, y = a[i].reshape(-1), b[i].reshape(-1)
        for s in range(start, stop, _DOT_CHUNK):
            e = min(stop, s + _DOT_CHUNK)
            m = e - s
            bx[:m].copy_(x[s:e])
            by[:m].copy_(y[s:e])
            total += torch.dot(bx[:m], by[:m])
    return total


def dot_tensor(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i <a_i, b_i>`` as a float64 scalar tensor on the first block's device (no host sync).

    Every product and partial sum is formed in float64 (blocks are converted, never reduced in their own
    dtype). On a CPU the conversion runs on one core per call, so long vectors are split among threads
    (:mod:`hess_utils._threads`; fixed split, partial sums added in a fixed order)."""
    _check_pair(a, b)
    if not a:
        raise ValueError("empty vector list")
    home = a[0].device
    total = torch.zeros((), dtype=torch.float64, device=home)
    split = _cpu_split(a, b)
    if split is not None:
        blocks, shares = split
        pool = _threads.thread_pool(len(shares))
        jobs = [pool.submit(_ranges_dot64, a, b, [(blocks[j], s, e) for j, s, e in share]) for share in shares]
        for job in jobs:
            total = total + job.result().to(home)
        done = set(blocks)
    else:
        done = set()
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i not in done:
            total = total + _block_dot64(x, y).to(home)
    return total


_MIN_SPLIT_ENTRIES = 1 << 18  # per worker; shorter vectors are not worth a thread hand-off
_MIN_SPLIT_BLOCK = 1 << 12  # smaller blocks are converted whole on the calling thread


def _cpu_split(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]):
    """``(blocks, shares)`` for the long CPU blocks that need a float64 conversion, or None."""
    workers = _threads.cpu_workers()
    if workers < 2:
        return None
    blocks = [
        i for i, (x, y) in enumerate(zip(a, b, strict=True))
        if x.device.type == y.device.type == "cpu" and not (x.dtype == y.dtype == torch.float64)
        and x.numel() >= _MIN_SPLIT_BLOCK
    ]
    sizes = [a[i].numel() for i in blocks]
    if sum(sizes) < _MIN_SPLIT_ENTRIES * workers:
        return None
    shares = _threads.deal(sizes, workers, piece=_DOT_CHUNK)
    return (blocks, shares) if len(shares) > 1 else None


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product ``sum_i <a_i, b_i>``, accumulated in float64, as a Python float."""
    return float(dot_tensor(a, b))


def norm(a: Sequence[torch.Tensor]) -> float:
    """Euclidean norm ``sqrt(sum_i ||a_i||^2)``, accumulated in float64."""
    return math.sqrt(max(dot(a, a), 0.0))


def axpy_(alpha: float | torch.Tensor, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> None:
    """In place ``y <- y + alpha * x`` block by block."""
    _check_pair(x, y)
    if not isinstance(alpha, torch.Tensor) and all(
        xi.device == yi.device and xi.dtype == yi.dtype for xi, yi in zip(x, y, strict=True)
    ):
        # One call for all blocks: a model's dozens of short blocks cost more in per-call overhead than in work.
        torch._foreach_add_(list(y), list(x), alpha=alpha)
        return
    for xi, yi in zip(x, y, strict=True):
        if isinstance(alpha, torch.Tensor):
            yi.add_(alpha.to(device=yi.device, dtype=yi.dtype) * xi.to(yi.device))
        else:
            yi.add_(xi.to(yi.device), alpha=alpha)


def scale_(alpha: float | torch.Tensor, x: Sequence[torch.Tensor]) -> None:
    """In place ``x <- alpha * x``."""
    for xi in x:
        xi.mul_(alpha.to(device=xi.device, dtype=xi.dtype) if isinstance(alpha, torch.Tensor) else alpha)


def add(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor], alpha: float = 1.0) -> TensorList:
    """New list ``x + alpha * y``."""
    _check_pair(x, y)
    return [xi + alpha * yi.to(xi.device) for xi, yi in zip(x, y, strict=True)]


def scaled(alpha: float, x: Sequence[torch.Tensor]) -> TensorList:
    """New list ``alpha * x``."""
    return [alpha * xi for xi in x]


def clone(x: Sequence[torch.Tensor]) -> TensorList:
    """A detached copy."""
    return [xi.detach().clone() for xi in x]


def zeros_like(x: Sequence[torch.Tensor]) -> TensorList:
    """Zeros with the shapes, dtypes and devices of ``x``."""
    return [torch.zeros_like(xi) for xi in x]


def to_device(x: Sequence[torch.Tensor], device: torch.device | str) -> TensorList:
    """Every block moved to ``device`` (e.g. to offload a Lanczos basis vector to CPU)."""
    return [xi.to(device) for xi in x]


def like(x: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> TensorList:
    """``x`` moved to the devices and dtypes of ``reference`` block by block."""
    _check_pair(x, reference)
    return [xi.to(device=r.device, dtype=r.dtype) for xi, r in zip(x, reference, strict=True)]


def flatten(x: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One flat CPU tensor of all blocks in order (for small problems and scipy)."""
    return torch.cat([xi.detach().reshape(-1).to("cpu", dtype) for xi in x])


def unflatten(flat: torch.Tensor, reference: Sequence[torch.Tensor]) -> TensorList:
    """Split a flat tensor into blocks shaped, typed and placed like ``reference``."""
    sizes = [r.numel() for r in reference]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat vector has {flat.numel()} entries, expected {sum(sizes)}")
    parts = torch.split(flat.reshape(-1), sizes)
    return [p.reshape(r.shape).to(device=r.device, dtype=r.dtype) for p, r in zip(parts, reference, strict=True)]


def random_like(
    reference: Sequence[torch.Tensor],
    kind: str = "rademacher",
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> TensorList:
    """A random probe shaped like ``reference``: Rademacher (+-1) or standard Gaussian entries.

    Entries are drawn on the CPU from one seeded generator, block after block, then moved to each block's
    device, so the same seed gives the same vector whatever the devices or the engine.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; choose one of {PROBE_KINDS}")
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0 if seed is None else int(seed))
    out: TensorList = []
    for r in reference:
        if kind == "rademacher":
            draw = torch.randint(0, 2, r.shape, generator=generator, dtype=torch.int8).to(r.dtype) * 2 - 1
        else:
            draw = torch.randn(r.shape, generator=generator, dtype=torch.float64).to(r.dtype)
        out.append(draw.to(r.device))
    return out


def numel(x: Sequence[torch.Tensor]) -> int:
    """Total number of entries."""
    return sum(xi.numel() for xi in x)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: MemAvailable, plus what a driver holds freed in
    the heap for reuse, :mod:`hess_utils._memory`), None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 + _memory.held_bytes()
    except (OSError, RuntimeError, ValueError):
        return None
    return None
