"""How the statistics of all processes are combined before a DBP update, sending only what the update needs.

Each R's update needs the sum over every process's sampled rows z of ``z^T z`` and the number of rows. Two forms
carry that exactly (no approximation, and the same R on every process):

- the upper triangle of ``sum z^T z`` (it is symmetric: d (d + 1) / 2 numbers, not d^2), summed by one all-reduce
  over every layer that takes this form;
- the rows themselves, where they are fewer numbers on the wire: P processes padded to the most rows m any of them
  has, while P m < d (an all-gather sends (P - 1) m d numbers per process, a ring all-reduce of the triangle about
  (P - 1) / P d^2). One all-gather for every such layer; every process concatenates the rows in rank order, so it
  computes from the very same rows, and takes the update's rows form or forms z^T z from them by the rule one
  process uses (:func:`takes_rows_form`). For fc2 of ViT-B/16 at the default batch (d = 3072, 320 rows per process)
  that is 1 M numbers per process instead of 4.7 M (the triangle) or 9.4 M (the matrix).

Which form a layer takes depends on the row counts of all processes, exchanged first: a few integers, sent over a
CPU (gloo) group so that no accelerator is read. The two collectives run concurrently (``async_op``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# (count, sum of z^T z or None, rows or None), per layer: what `Decorrelation.update` is computed from.
Statistics = tuple[int, "torch.Tensor | None", "torch.Tensor | None"]

_HOST_GROUPS: dict = {}
# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; hf_dbp supports torch >= 2.4.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def host_group(group=None):
    """A process group that carries CPU tensors for the processes of `group` (`None`: every process), or None.

    A gloo group is its own; for the default group of another backend (NCCL), a gloo group over the same processes
    is created once, on every process at its first step. None where neither holds (a custom NCCL subgroup, whose
    other processes would not join a new group): the counts then travel on the device.
    """
    backend = dist.get_backend(group)
    if backend == "gloo" or "cpu:gloo" in backend:
        return group
    if group is not None and group != dist.group.WORLD:
        return None
    if "world" not in _HOST_GROUPS:
        _HOST_GROUPS["world"] = dist.new_group(backend="gloo")
    return _HOST_GROUPS["world"]


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """The entries on and above the diagonal of a square matrix, row by row (d (d + 1) / 2 of them)."""
    rows, columns = torch.triu_indices(matrix.shape[0], matrix.shape[0], device=matrix.device)
    return matrix[rows, columns]


def symmetric_from_upper_triangle(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric `dim x dim` matrix whose upper triangle `upper_triangle` gave as `values`."""
    rows, columns = torch.triu_indices(dim, dim, device=values.device)
    matrix = values.new_zeros(dim, dim)
    matrix[rows, columns] = values
    matrix[columns, rows] = values
    return matrix


def takes_rows_form(total_rows: int, dim: int) -> bool:
    """Whether the update of a `dim`-wide R from `total_rows` rows is taken from the rows (else from z^T z)."""
    return 2 * total_rows < dim


def _gather_counts(counts: list[int], group, device: torch.device) -> list[list[int]]:
    """Every process's row count per layer, `[process][layer]`, on every process."""
    world = dist.get_world_size(group)
    host = host_group(group)
    where = torch.device("cpu") if host is not None else device
    local = torch.tensor(counts, dtype=torch.int64, device=where)
    gathered = torch.empty(world * len(counts), dtype=torch.int64, device=where)  # gloo: the concatenated form
    _all_gather_single(gathered, local, group=host if host is not None else group)
    return gathered.reshape(world, len(counts)).tolist()


def combine_statistics(
    dims: list[int], local: list[Statistics], device: torch.device, dtype: torch.dtype, group=None
) -> list[Statistics]:
    """The statistics of all processes in `group`, per layer, from this process's `local` ones.

    `dims[i]` is the width of layer i's R; `local[i]` holds its rows while they have not been folded into a sum on
    this process (see `Decorrelation.observe`), else its sum of z^T z (or neither, without rows). Every process
    returns the same values, on `device` in `dtype` (R's); layers are combined in one all-gather (rows form) and one
    all-reduce (triangle form).
    """
    counts = _gather_counts([count for count, _, _ in local], group, device)
    world = len(counts)
    totals = [sum(per_process[i] for per_process in counts) for i in range(len(local))]
    most = [max(per_process[i] for per_process in counts) for i in range(len(local))]
    # Rows travel while fewer numbers than the triangle; strictly below d / P per process, so that no process has
    # folded its rows into a sum (it does so at d / 2, Decorrelation.observe).
    rows_form = [world * most[i] < dims[i] for i in range(len(local))]

    # Each process's rows padded to the most any process has, so that every chunk has one size.
    padded = [most[i] if rows_form[i] else 0 for i in range(len(local))]
    row_chunks = []
    for i, (count, zz, rows) in enumerate(local):
        if rows_form[i]:
            if zz is not None:  # cannot happen: a process folds its rows only past d / 2 of them (observe)
                raise RuntimeError(f"a process folded the rows of a {dims[i]}-wide R that all processes send as rows")
            chunk = torch.zeros(padded[i], dims[i], dtype=dtype, device=device)
            if count:
                chunk[:count] = rows
            row_chunks.append(chunk.reshape(-1))
    triangle_chunks = []
    for i, (_, zz, _) in enumerate(local):
        if not rows_form[i]:
            if zz is None:  # no rows on this process, or rows not yet folded into a sum
                rows = local[i][2]
                zz = rows.t() @ rows if rows is not None else torch.zeros(dims[i], dims[i], dtype=dtype, device=device)
            triangle_chunks.append(upper_triangle(zz.to(dtype)))

    pending = []
    if row_chunks:
        flat_rows = torch.cat(row_chunks)
        gathered_rows = flat_rows.new_empty(world * flat_rows.numel())
        pending.append(_all_gather_single(gathered_rows, flat_rows, group=group, async_op=True))
    if triangle_chunks:
        flat_triangles = torch.cat(triangle_chunks)
        pending.append(dist.all_reduce(flat_triangles, op=dist.ReduceOp.SUM, group=group, async_op=True))
    for work in pending:
        work.wait()
    if row_chunks:
        gathered_rows = gathered_rows.reshape(world, -1)

    combined: list[Statistics] = []
    row_offset = triangle_offset = 0
    for i, dim in enumerate(dims):
        if rows_form[i]:
            size = padded[i] * dim
            per_process = gathered_rows[:, row_offset : row_offset + size].reshape(world, padded[i], dim)
            rows = torch.cat([per_process[r, : counts[r][i]] for r in range(world)])
            if takes_rows_form(totals[i], dim):
                combined.append((totals[i], None, rows))
            else:  # the rows travelled as the fewer numbers, but X R is the cheaper update from this many
                combined.append((totals[i], rows.t() @ rows, None))
            row_offset += size
        else:
            size = dim * (dim + 1) // 2
            zz = symmetric_from_upper_triangle(flat_triangles[triangle_offset : triangle_offset + size], dim)
            combined.append((totals[i], zz, None))
            triangle_offset += size
    return combined
