"""How the statistics of all processes are combined before a DBP update, sending only what the update needs.

Each R's update needs the sum over every process's sampled rows z of `z^T z` and the number of rows. Two forms
carry that exactly (no approximation, and the same R on every process):

- the upper triangle of `sum z^T z` (it is symmetric: d (d + 1) / 2 numbers, not d^2), summed by one all-reduce
  over every layer that takes this form;
- the rows themselves, where they are fewer numbers: each process's rows padded to the most rows m any process has,
  while P m < d by all-gather (it sends (P - 1) m d numbers per process, a ring all-reduce of the triangle about
  (P - 1) / P d^2), or on gloo, whose all-gather is slow, in the all-reduce, in slots of their own (P m d numbers,
  while 2 P m < d). Every process concatenates the rows in rank order, so it computes from the very same rows, and
  takes the update's rows form or forms z^T z from them by the rule one process uses ([`takes_rows_form`]).
  For fc2 of ViT-B/16 at the default batch (d = 3072, 320 rows per process) that is 1 M numbers per process
  (2 M in gloo's slots) instead of 4.7 M (the triangle) or 9.4 M (the matrix).

Which form a layer takes depends on the row counts of all processes, exchanged first: a few integers, sent over a
CPU (gloo) group so that no accelerator is read. All layers then travel in one all-reduce and (NCCL) one
all-gather, run concurrently (`async_op`).

Optionally the numbers travel in 16 bits (`transfer_dtype`), half the bytes: the rows as they are, and each
triangle divided by the layer's total row count first, so that what is summed is the second moment X (entries of
order 1) and not a sum that grows with the batch (float16 would overflow). Every process receives the very same
16-bit numbers and converts them back the same way, so R stays identical across processes; what changes is R itself,
by the rounding of its statistics (measured: `benchmarks/distributed_step.py --transfer_dtype`, docs/distributed.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# (count, sum of z^T z or None, rows or None), per layer: what `Decorrelation.update` is computed from.
Statistics = tuple[int, "torch.Tensor | None", "torch.Tensor | None"]

_HOST_GROUPS: dict = {}
TRANSFER_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What `transfer_dtype` may name: None (or "float32") sends the statistics in R's precision."""
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


def resolve_transfer_dtype(transfer_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype the statistics travel in (None: R's own), from a dtype or a name in [`TRANSFER_DTYPES`]."""
    if transfer_dtype is None or isinstance(transfer_dtype, torch.dtype) and transfer_dtype.is_floating_point:
        return None if transfer_dtype in (None, torch.float32) else transfer_dtype
    if transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer_dtype must be one of {list(TRANSFER_DTYPES)}, got {transfer_dtype!r}")
    return TRANSFER_DTYPES[transfer_dtype]


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


def rows_by_all_gather(group=None) -> bool:
    """How rows travel: by all-gather (NCCL and the others), or on gloo in the all-reduce, each process's rows in its
    own slot of a zeroed buffer. gloo's all-gather is slow: on 2 CPU processes it took 0.94 s for ViT-B/16's rows
    (20.6 M numbers from each process), where the all-reduce of the whole exchange of hf-dbp 0.1.0, 6.5 times as many
    numbers, took 0.28 s (benchmarks/README.md, "Between processes")."""
    return dist.get_backend(group) != "gloo"


class StatisticsExchange:
    """The statistics of all processes in `group`, per layer, being combined from this process's `local` ones.

    Constructing it exchanges the row counts and starts the collectives (asynchronously); `wait()` returns the
    combined statistics. In between, the process can go on (its backward: `begin_decorrelation_step`).

    `dims[i]` is the width of layer i's R; `local[i]` holds its rows while they have not been folded into a sum on
    this process (see `Decorrelation.observe`), else its sum of z^T z (or neither, without rows). Every process
    gets the same values, on `device` in `dtype` (R's). All layers travel together: one all-reduce (the triangles;
    on gloo the rows too) and, where rows travel by all-gather, one all-gather, concurrently. `transfer_dtype` (a
    16-bit float dtype, or a name in [`TRANSFER_DTYPES`]) sends them in that precision instead.
    """

    def __init__(
        self,
        dims: list[int],
        local: list[Statistics],
        device: torch.device,
        dtype: torch.dtype,
        group=None,
        transfer_dtype: torch.dtype | str | None = None,
    ) -> None:
        transfer_dtype = resolve_transfer_dtype(transfer_dtype)
        wire = dtype if transfer_dtype is None else transfer_dtype
        counts = _gather_counts([count for count, _, _ in local], group, device)
        world = len(counts)
        gather = rows_by_all_gather(group)
        totals = [sum(per_process[i] for per_process in counts) for i in range(len(local))]
        most = [max(per_process[i] for per_process in counts) for i in range(len(local))]
        # Rows travel where they are fewer numbers than the triangle: by all-gather P m d on the wire against about
        # (P - 1) / P d^2 (P m < d); in all-reduce slots P m d against d (d + 1) / 2 (2 P m < d). Either bound keeps
        # every process below d / 2 rows, where it would have folded them into a sum (Decorrelation.observe).
        rows_form = [(1 if gather else 2) * world * most[i] < dims[i] for i in range(len(local))]
        padded = [most[i] if rows_form[i] else 0 for i in range(len(local))]  # so that every process's chunk is alike
        rank = dist.get_rank(group)

        row_chunks, reduced_chunks = [], []
        for i, (count, zz, rows) in enumerate(local):
            if rows_form[i]:
                if zz is not None:  # cannot happen, by the bound above
                    raise RuntimeError(
                        f"a process folded the rows of a {dims[i]}-wide R that all processes send as rows"
                    )
                chunk = torch.zeros(1 if gather else world, padded[i], dims[i], dtype=wire, device=device)
                if count:
                    chunk[0 if gather else rank, :count] = rows
                (row_chunks if gather else reduced_chunks).append(chunk.reshape(-1))
        for i, (_, zz, rows) in enumerate(local):
            if not rows_form[i]:
                if zz is None:  # rows not folded into a sum yet, or no rows on this process
                    zz = (
                        rows.t() @ rows
                        if rows is not None
                        else torch.zeros(dims[i], dims[i], dtype=dtype, device=device)
                    )
                triangle = upper_triangle(zz.to(dtype))
                if wire != dtype:  # X's entries, of order 1, travel; the sum is restored from them after the exchange
                    triangle = (triangle / max(totals[i], 1)).to(wire)
                reduced_chunks.append(triangle)

        self._work = []
        self._gathered = self._reduced = None
        if row_chunks:
            flat_rows = torch.cat(row_chunks)
            self._gathered = flat_rows.new_empty(world * flat_rows.numel())
            self._work.append(_all_gather_single(self._gathered, flat_rows, group=group, async_op=True))
        if reduced_chunks:
            self._reduced = torch.cat(reduced_chunks)
            self._work.append(dist.all_reduce(self._reduced, op=dist.ReduceOp.SUM, group=group, async_op=True))
        self._layout = (dims, counts, totals, rows_form, padded, gather, dtype, wire)

    def wait(self) -> list[Statistics]:
        for work in self._work:
            work.wait()
        dims, counts, totals, rows_form, padded, gather, dtype, wire = self._layout
        world = len(counts)
        gathered = self._gathered.reshape(world, -1).to(dtype) if self._gathered is not None else None
        reduced = self._reduced.to(dtype) if self._reduced is not None else None
        combined: dict[int, Statistics] = {}
        gathered_offset = reduced_offset = 0
        for i, dim in enumerate(dims):
            if rows_form[i]:
                size = padded[i] * dim
                if gather:
                    per_process = gathered[:, gathered_offset : gathered_offset + size].reshape(world, padded[i], dim)
                    gathered_offset += size
                else:
                    per_process = reduced[reduced_offset : reduced_offset + world * size].reshape(
                        world, padded[i], dim
                    )
                    reduced_offset += world * size
                rows = torch.cat([per_process[r, : counts[r][i]] for r in range(world)])  # in rank order, everywhere
                if takes_rows_form(totals[i], dim):
                    combined[i] = (totals[i], None, rows)
                else:  # the rows travelled as the fewer numbers, but X R is the cheaper update from this many
                    combined[i] = (totals[i], rows.t() @ rows, None)
        for i, dim in enumerate(dims):
            if not rows_form[i]:
                size = dim * (dim + 1) // 2
                zz = symmetric_from_upper_triangle(reduced[reduced_offset : reduced_offset + size], dim)
                if wire != dtype:
                    zz = zz * totals[i]
                combined[i] = (totals[i], zz, None)
                reduced_offset += size
        return [combined[i] for i in range(len(dims))]
