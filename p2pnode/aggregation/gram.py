"""Pairwise inner products of the inputs (the Gram matrix) in one chunked pass.

Krum, the geometric median, centered clipping and the Flag Aggregator only need the inputs' pairwise
inner products until their very last step, which is a linear combination of the inputs. So each of them
reads the inputs twice (once here, once in `inputs.combine`) and does all its iterations on a ``p x p``
matrix.

Precision: each chunk is copied into a float64 scratch buffer, so products of float32 (or 16-bit) inputs
are exact and only the float64 sums round. With ``origin``, the chunk is first translated so that input
``origin`` sits at 0; distances are unchanged and no precision is lost to cancellation when the inputs
are whole models that differ by little (``|v_i|^2 + |v_j|^2 - 2<v_i, v_j>`` would cancel).

Memory: a ``p x chunk`` float64 buffer (4 MiB on CPU), never a ``(p, d)`` stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from p2pnode.aggregation.inputs import chunk_elems, fill_rows, first_non_finite, iter_chunks, raise_non_finite


def gram(
    vectors: Sequence[Sequence[torch.Tensor]],
    sizes: Sequence[int],
    device: torch.device,
    *,
    origin: int | None = None,
) -> torch.Tensor:
    """Return ``G[i, j] = <v_i - v_o, v_j - v_o>`` as a float64 CPU tensor of shape ``(p, p)``.

    Args:
        vectors: p vectors, each a list of 1-D pieces with the given sizes.
        sizes: elements per piece.
        device: where the pieces live (the scratch buffer goes there too).
        origin: index ``o`` of the vector to translate to 0, or None for plain inner products.

    Raises:
        AggregationError: an input holds NaN or Inf (detected on the diagonal, without an extra pass).
    """
    p = len(vectors)
    total = sum(sizes)
    chunk = max(1, min(chunk_elems(device, p), total))
    buf = torch.empty((p, chunk), dtype=torch.float64, device=device)
    on_cpu = device.type == "cpu"
    # On CPU, numpy's BLAS multiplies these short-and-wide (p x chunk) blocks as fast as torch.mm on one
    # thread and 2-3x faster on two busy cores (measured); both see the same memory, so no copy is made.
    acc_np = np.zeros((p, p), dtype=np.float64) if on_cpu else None
    acc_t = None if on_cpu else torch.zeros((p, p), dtype=torch.float64, device=device)
    buf_np = buf.numpy() if on_cpu else None
    # NaN/Inf inputs are detected on the diagonal afterwards, so numpy need not warn about them
    with np.errstate(invalid="ignore", over="ignore"):
        for n, segs in iter_chunks(sizes, chunk):
            fill_rows(buf, vectors, segs)
            if buf_np is not None and acc_np is not None:
                b = buf_np[:, :n]
                if origin is not None:
                    b -= b[origin].copy()
                acc_np += b @ b.T
            elif acc_t is not None:
                bt = buf[:, :n]
                if origin is not None:
                    bt -= bt[origin].clone()
                acc_t.addmm_(bt, bt.T)
    g = torch.from_numpy(acc_np) if acc_np is not None else torch.as_tensor(acc_t).cpu()
    g = 0.5 * (g + g.T)  # exact symmetry for the eigen-solvers downstream
    if not bool(torch.isfinite(g.diagonal()).all()):
        raise_non_finite(first_non_finite(vectors))
    return g


def sq_distances(g: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the vectors whose Gram matrix is `g` (clamped at 0)."""
    d = g.diagonal()
    return (d[:, None] + d[None, :] - 2.0 * g).clamp_min_(0.0)


def point_sq_distances(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Squared distances from the point ``sum_i a_i v_i`` (with ``sum a = 1``) to every ``v_j``.

    ``|z - v_j|^2 = a'Ga - 2 (Ga)_j + G_jj``, valid for any origin of the Gram matrix because the
    coefficients sum to 1.
    """
    ga = g @ a
    return (a @ ga - 2.0 * ga + g.diagonal()).clamp_min_(0.0)
