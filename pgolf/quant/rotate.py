"""OptRot-style randomised Hadamard rotation of a matrix's input dimension before quantisation.

With ``quant.rotate=hadamard`` every 2-D tensor stored in an integer format is quantised as
``W_rot = W Q`` with ``Q = D B``: ``D = diag(s)`` a random sign vector and ``B`` block-diagonal with
blocks ``H_b / sqrt(b)`` (Sylvester Hadamard, ``b`` = the largest power of two dividing the column
count, so 512 -> one 512 block, 1536 -> three 512 blocks). ``Q`` is orthogonal, so outliers spread
over a block and ``W = W_rot Q^T`` exactly; a matrix with an odd column count (no block >= 2) is a
ConfigError. GPTQ sees the rotated layer consistently: its input is ``x Q``, its Hessian
``Q^T H Q``.

The signs are not stored: they are a pure function of the artifact's rotation seed and the
tensor's name (the raw output of numpy's PCG64 bit generator, stable across numpy versions), so the
artifact carries only ``meta["rotate"] = {"kind": "hadamard", "seed": S, "tensors": [names]}``
(written and validated by ``pgolf.quant.container``). Dequantisation undoes it
(``pgolf.quant.export.dequantize_tensor``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from pgolf.errors import ConfigError

ROTATE_KINDS = ("none", "hadamard")


def hadamard_block(cols: int) -> int:
    """The largest power of two dividing ``cols`` (the block size of the block-diagonal Hadamard)."""
    return cols & -cols if cols > 0 else 0


@lru_cache(maxsize=16)
def _sylvester(b: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / float(np.sqrt(b))


def sign_vector(seed: int, name: str, cols: int) -> Tensor:
    """The +-1 signs [cols] of tensor ``name`` under rotation seed ``seed`` (float64)."""
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])).random_raw(cols) & 1
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))


@dataclass(frozen=True)
class Rotation:
    """The rotation of one tensor's columns: ``Q = diag(signs) . blockdiag(H_b / sqrt(b))``."""

    seed: int
    name: str
    cols: int

    @property
    def block(self) -> int:
        return hadamard_block(self.cols)

    @staticmethod
    def for_tensor(seed: int, name: str, shape: tuple[int, ...]) -> "Rotation":
        if len(shape) != 2:
            raise ConfigError(f"quant.rotate=hadamard: {name} has shape {list(shape)}, only 2-D matrices rotate; set quant.rotate=none")
        if hadamard_block(shape[1]) < 2:
            raise ConfigError(f"quant.rotate=hadamard: {name} has an odd input dimension {shape[1]} (no Hadamard block >= 2); set quant.rotate=none")
        return Rotation(int(seed), name, int(shape[1]))

    def _blocks(self, w: Tensor) -> Tensor:
        b = self.block
        h = _sylvester(b)
        rows = w.shape[0]
        return (w.reshape(rows, self.cols // b, b) @ h).reshape(rows, self.cols)

    def apply(self, w: Tensor) -> Tensor:
        """``W Q`` in float32 (computed in float64)."""
        w64 = w.detach().to(torch.float64).cpu()
        return self._blocks(w64 * sign_vector(self.seed, self.name, self.cols)).float()

    def undo(self, w_rot: Tensor) -> Tensor:
        """``W_rot Q^T`` in float32 (B is symmetric: ``W_rot Q^T = (W_rot B) D``)."""
        w64 = w_rot.detach().to(torch.float64).cpu()
        return (self._blocks(w64) * sign_vector(self.seed, self.name, self.cols)).float()

    def matrix(self) -> Tensor:
        """``Q`` [cols, cols], float64."""
        return self._blocks(torch.diag(sign_vector(self.seed, self.name, self.cols)))

    def rotate_hessian(self, h: Tensor) -> Tensor:
        """``Q^T H Q``: the Hessian of the rotated layer (its input is ``x Q``)."""
        q = self.matrix().to(h.device)  # GPTQ runs where its Hessian is (the GPU in a real run)
        return (q.T @ h.detach().to(torch.float64) @ q).to(h.dtype)
