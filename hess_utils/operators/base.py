"""The one operator interface every algorithm takes, whatever engine computes the products.

A vector is a list of tensors, one block per selected parameter (or one block for a dense matrix), each
on its block's device and in its block's dtype. An operator knows its block shapes, dtypes and devices, and
computes ``H v`` for a symmetric ``H`` of size ``dim x dim``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from hess_utils import vectors as V
from hess_utils.vectors import TensorList


class SymmetricOperator(ABC):
    """A symmetric linear operator ``H`` acting on vector lists.

    Subclasses implement :meth:`_matvec` and set ``param_names``, ``shapes``, ``dtypes``, ``devices``.

    Attributes
    ----------
    param_names : list[str]
        The order of the blocks of every vector list.
    shapes : list[torch.Size]
        Shape of each block.
    dtypes, devices : list
        dtype and device of each block.
    batched_matmat : bool
        Whether :meth:`matmat` of ``k`` vectors costs less than ``k`` products one after the other (False
        here: the default :meth:`matmat` is that loop); algorithms use it to decide whether to run probes
        together.
    product_rtol : float or None
        The relative accuracy of a product where it is far worse than the dtype's rounding (finite
        differences), else None. A product that accurate is also only that symmetric, and Lanczos loses
        orthogonality at that rate: ``reorth="partial"`` starts its estimates at this level
        (:func:`~hess_utils.algorithms.lanczos.omega_rounding`).
    """

    param_names: list[str]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    devices: list[torch.device]
    batched_matmat: bool = False
    product_rtol: float | None = None

    @property
    def dim(self) -> int:
        """Number of scalar entries of a vector (the matrix is ``dim x dim``)."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first block (all blocks share it for the operators built here)."""
        return self.dtypes[0]

    @abstractmethod
    def _matvec(self, v: TensorList) -> TensorList:
        """Compute ``H v`` for a checked vector list."""

    def matvec(self, v: Sequence[torch.Tensor]) -> TensorList:
        """``H v`` for a vector list ``v`` (blocks shaped like :attr:`shapes`, on :attr:`devices`).

        Blocks on another device or in another dtype are moved; wrong shapes or counts are refused.
        The wall time of each product is appended to :attr:`product_seconds`.
        """
        start = time.perf_counter()
        out = self._matvec(self.check_vector(v))
        self.record_product_time(time.perf_counter() - start, 1)
        return out

    def matmat(self, vectors: Sequence[Sequence[torch.Tensor]]) -> list[TensorList]:
        """``[H v for v in vectors]``; operators that can batch the products override this."""
        return [self.matvec(v) for v in vectors]

    @property
    def product_seconds(self) -> list[float]:
        """Wall time of every product so far, in seconds (a batched product counts its share per vector)."""
        return self.__dict__.setdefault("_product_seconds", [])

    def record_product_time(self, seconds: float, count: int) -> None:
        """Note ``count`` products that took ``seconds`` together (operators that batch call this)."""
        self.product_seconds.extend([seconds / count] * count)

    def __matmul__(self, v: Sequence[torch.Tensor]) -> TensorList:
        return self.matvec(v)

    def check_vector(self, v: Sequence[torch.Tensor]) -> TensorList:
        """Validate ``v`` against this operator and return it placed on the operator's devices/dtypes."""
        if isinstance(v, torch.Tensor):
            raise TypeError(
                "vectors are lists of tensors, one per block; wrap a flat tensor with "
                "hess_utils.vectors.unflatten(flat, op.zeros())"
            )
        v = list(v)
        if len(v) != len(self.shapes):
            raise ValueError(
                f"vector has {len(v)} blocks but the operator has {len(self.shapes)} "
                f"({', '.join(self.param_names[:4])}{', ...' if len(self.param_names) > 4 else ''})"
            )
        out = []
        for name, vi, shape, dtype, device in zip(
            self.param_names, v, self.shapes, self.dtypes, self.devices, strict=True
        ):
            if tuple(vi.shape) != tuple(shape):
                raise ValueError(f"block {name!r}: shape {tuple(vi.shape)} but expected {tuple(shape)}")
            if vi.device != device or vi.dtype != dtype:
                vi = vi.to(device=device, dtype=dtype)
            out.append(vi)
        return out

    # ------------------------------------------------------------------ vectors of this operator
    def zeros(self) -> TensorList:
        """A zero vector list of this operator."""
        return [torch.zeros(s, dtype=d, device=dev) for s, d, dev in zip(self.shapes, self.dtypes, self.devices)]

    def random_vector(self, kind: str = "rademacher", seed: int = 0) -> TensorList:
        """A seeded random probe (Rademacher or Gaussian), identical across engines and devices."""
        return V.random_like(self.zeros(), kind=kind, seed=seed)

    def locate(self, index: int) -> tuple[int, int]:
        """``(block, flat index inside the block)`` of a global (flattened, block-ordered) index."""
        if not 0 <= index < self.dim:
            raise IndexError(f"index {index} out of range for an operator of dimension {self.dim}")
        offset = 0
        for block, shape in enumerate(self.shapes):
            size = math.prod(shape)
            if index < offset + size:
                return block, index - offset
            offset += size
        raise AssertionError("unreachable: index < dim = the sum of the block sizes")

    def basis_vector(self, index: int) -> TensorList:
        """The unit vector ``e_index`` for a global (flattened, block-ordered) index."""
        block, local = self.locate(index)
        out = self.zeros()
        out[block].view(-1)[local] = 1
        return out

    # ------------------------------------------------------------------ conversions
    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on flat float64 numpy vectors (block order)."""
        from scipy.sparse.linalg import LinearOperator

        reference = self.zeros()

        def mv(x: np.ndarray) -> np.ndarray:
            flat = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))
            return V.flatten(self.matvec(V.unflatten(flat, reference))).numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, dtype=np.float64)

    def to_dense(self, progress: bool = False) -> torch.Tensor:
        """The full ``dim x dim`` float64 matrix, one column per matvec (small operators only)."""
        if self.dim > 20_000:
            raise ValueError(f"to_dense on dim={self.dim} would need {self.dim}^2 entries; use a subset")
        from hess_utils.progress import progress_bar

        cols = [
            V.flatten(self.matvec(self.basis_vector(i)))
            for i in progress_bar(range(self.dim), disable=not progress, desc="dense columns")
        ]
        return torch.stack(cols, dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, blocks={len(self.shapes)}, dtype={self.dtype})"
