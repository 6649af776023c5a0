"""The decorrelation step: update every R from the statistics of the training forwards since the last step, with
the statistics of all processes combined first (see [`hf_dbp.core.collectives`]), so every process keeps the same R.

[`update_decorrelations`] takes the step over a list of [`~hf_dbp.core.decorrelation.Decorrelation`] modules with
the settings given; `hf_dbp.decorrelation_step(model)` ([`hf_dbp.core.model`]) reads the settings from the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .collectives import StatisticsExchange, resolve_transfer_dtype
from .config import VARIANCE_FORMS
from .decorrelation import Decorrelation, update_rule


class DecorrelationDiverged(FloatingPointError):
    """Raised by [`update_decorrelations`] with `on_divergence="raise"` instead of skipping an update."""


class PendingStatistics:
    """The statistics of a step, taken out of the modules and (over several processes) being combined."""

    def __init__(self, decorrelations: list[Decorrelation], statistics, exchange=None) -> None:
        self.decorrelations = decorrelations
        self._statistics = statistics
        self._exchange = exchange

    def wait(self) -> list:
        """Per module: (row count, sum of z^T z or None, rows or None), over all processes."""
        if self._exchange is not None:
            self._statistics, self._exchange = _join_blocks(self.decorrelations, self._exchange.wait()), None
        return self._statistics


def _split_blocks(decorrelations: list[Decorrelation], statistics: list) -> tuple[list[int], list]:
    """The widths and statistics the exchange between processes carries: those of each full R, and each block of a
    block-diagonal R as an R of its own (its slice of the rows, or its block of z^T z), so that the exchange sends
    only what the blocks' updates need."""
    dims, local = [], []
    for d, (count, zz, rows) in zip(decorrelations, statistics, strict=True):
        if not d.is_block_diagonal:
            dims.append(d.dim)
            local.append((count, zz, rows))
            continue
        block_rows = d.row_blocks(rows) if rows is not None else None
        for i in range(d.R.shape[0]):
            dims.append(d.block_width)
            local.append((count, zz[i] if zz is not None else None, block_rows[i] if rows is not None else None))
    return dims, local


def _join_blocks(decorrelations: list[Decorrelation], combined: list) -> list:
    """Each module's statistics from the exchange's entries (`_split_blocks` in reverse). The blocks of one R have
    the same width and row counts, so the exchange gave them all the same form."""
    joined, start = [], 0
    for d in decorrelations:
        blocks = d.R.shape[0] if d.is_block_diagonal else 1
        parts, start = combined[start : start + blocks], start + blocks
        count, zz, rows = parts[0]
        if blocks > 1 and zz is not None:
            zz = torch.stack([part[1] for part in parts])
        elif blocks > 1 and rows is not None:
            rows = torch.cat([part[2] for part in parts], dim=1)
        joined.append((count, zz, rows))
    return joined


@torch.no_grad()
def begin_decorrelation_step(
    decorrelations: Iterable[Decorrelation], process_group=None, transfer_dtype: torch.dtype | str | None = None
) -> PendingStatistics:
    """Take the statistics gathered since the last step out of the modules and, under `torch.distributed`, start
    combining them across processes; pass the result to [`update_decorrelations`] as `pending`.

    Called after the last forward of an optimizer step (its last gradient-accumulation micro-batch), the exchange
    runs while the backward and the optimizer step do, off the critical path ([`~hf_dbp.DecorrelationCallback`] does this). Every
    process must call it at the same point, as any collective. Forwards between the two calls must not gather
    statistics (the step refuses them).

    `transfer_dtype`: `"bfloat16"` or `"float16"` sends the statistics in 16 bits (half the bytes; R stays the
    same on every process but rounds differently: [`hf_dbp.core.collectives`]); `None` sends R's float32.
    """
    transfer_dtype = resolve_transfer_dtype(transfer_dtype)  # a bad name fails on one process as on several
    decorrelations = list(decorrelations)
    # Per layer: (count, second-moment sum or None, rows or None). Each layer updates from its rows while they are
    # the cheaper form (few rows: 2 n < d), else from z^T z; over several processes the same rule is applied to all
    # processes' rows together, and only what that form needs travels (hf_dbp.core.collectives).
    statistics = [d.take_statistics() for d in decorrelations]
    if not (decorrelations and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return PendingStatistics(decorrelations, statistics)
    reference = decorrelations[0].R
    # DBPTrainer begins inside the forward's autocast; z^T z formed here for the exchange must keep R's precision.
    dims, local = _split_blocks(decorrelations, statistics)
    with torch.autocast(device_type=reference.device.type, enabled=False):
        exchange = StatisticsExchange(
            dims,
            local,
            reference.device,
            reference.dtype,
            process_group,
            transfer_dtype,
        )
    return PendingStatistics(decorrelations, statistics=None, exchange=exchange)


@torch.no_grad()
def update_decorrelations(
    decorrelations: Iterable[Decorrelation],
    lr: float,
    kappa: float,
    process_group=None,
    max_loss: float = 1e6,
    on_divergence: str = "skip",
    variance_form: str = "rows",
    pending: PendingStatistics | None = None,
    transfer_dtype: torch.dtype | str | None = None,
    update: bool = True,
    batch_updates: bool | None = None,
) -> float | None:
    """Update every `R` from the statistics gathered since the last call, then clear them.

    `pending`: what [`begin_decorrelation_step`] returned for these modules after the step's last forward, so
    that the exchange between processes ran during the backward and the optimizer step.

    When `torch.distributed` is initialised, the statistics of all processes are combined first (each layer's
    rows, or the upper triangle of its z^T z, whichever the update needs: see [`hf_dbp.core.collectives`]), so
    every process applies the same update to the same `R` and the `R` stay identical across processes (the guard
    below decides the same way on every process too). `lr=0` only measures. The updates never wait for the device:
    the step reads it once, at the end, for every layer's loss and guard decision together.

    Guard: an update that would make an `R` non-finite, or whose loss is not finite or above `max_loss`, is
    skipped and counted in that module's `skipped_updates` (`on_divergence="skip"`), or raises
    [`DecorrelationDiverged`] (`"raise"`, after the other layers were updated) so that a run can stop rather
    than go on.

    `variance_form`: see [`~hf_dbp.core.config.VARIANCE_FORMS`]. `transfer_dtype`: see [`begin_decorrelation_step`].

    `update=False` takes an optimizer step without a decorrelation update: the statistics are kept (and go on
    accumulating) for the next call that updates, nothing is exchanged, and the layers' folded weights `W R` are
    still reformed for the new `W`. Passing `update=(step + 1) % k == 0` updates R every k optimizer steps from
    the statistics of all k, with a k-th of the traffic (`DBPTrainingArguments.decorrelation_update_every`).

    `batch_updates`: update equal-shaped R together, a stack at a time (one batched GEMM for many R, up to
    64 MiB per stack), instead of one after the other; `None` (the default) batches on accelerators, where each
    small R's update is bound by kernel launches, and not on the CPU. The results equal the one-by-one updates up to
    float rounding, and are the same on every process.

    Returns:
        The mean decorrelation loss over the layers that saw rows (finite losses only), or `None` if none did.
    """
    if on_divergence not in ("skip", "raise"):
        raise ValueError(f"on_divergence must be 'skip' or 'raise', got {on_divergence!r}")
    if variance_form not in VARIANCE_FORMS:
        raise ValueError(f"variance_form must be one of {VARIANCE_FORMS}, got {variance_form!r}")
    resolve_transfer_dtype(transfer_dtype)
    decorrelations = list(decorrelations)
    if not decorrelations:
        return None
    for d in decorrelations:
        # The folded weights W R are reformed after every optimizer step, also where W was written behind its version
        # counter (sharded optimizers) and where R did not move (lr = 0 or no update at this step).
        d.steps += 1
    if not update:
        if pending is not None:
            raise ValueError("the decorrelation step was given a pending exchange with update=False")
        return None
    reference = decorrelations[0].R
    if pending is None:
        pending = begin_decorrelation_step(decorrelations, process_group, transfer_dtype)
    elif pending.decorrelations != decorrelations:
        raise ValueError("the decorrelation step was given the pending exchange of other modules")
    elif any(d.num_rows for d in decorrelations):
        raise RuntimeError("statistics were gathered after begin_decorrelation_step; call it after the last forward")
    statistics = pending.wait()
    # Every update stays on the device; the losses and the guard's decisions of all layers are read in one go.
    updates = [
        (d, zz / count if zz is not None else None, rows)
        for d, (count, zz, rows) in zip(decorrelations, statistics, strict=True)
        if count > 0
    ]
    if batch_updates is None:  # an accelerator pays a kernel launch per operation and R; a CPU does not
        batch_updates = reference.device.type != "cpu"
    results = []
    for group in _equal_shaped_groups(updates) if batch_updates else [[u] for u in updates]:
        if len(group) == 1:
            d, second_moment, rows = group[0]
            if d.is_block_diagonal and rows is not None:  # (n, d) -> (blocks, n, b): each block's slice of the rows
                rows = d.row_blocks(rows)
            loss, applied = update_rule(d.R, second_moment, rows, lr, kappa, max_loss, variance_form)
            if d.is_block_diagonal:  # the blocks update together, each guarded; one figure for the R
                loss, applied = loss.mean(), applied.all()
            results.append((d, loss, applied))
            continue
        matrices = [d.R for d, _, _ in group]
        stacked = torch.stack(
            matrices
        )  # a transient copy of this group only (bounded by _BATCH_BYTES), not of every R
        second_moments = torch.stack([m for _, m, _ in group]) if group[0][1] is not None else None
        rows = torch.stack([r for _, _, r in group]) if group[0][1] is None else None
        loss, applied = update_rule(stacked, second_moments, rows, lr, kappa, max_loss, variance_form)
        torch._foreach_copy_(matrices, list(stacked.unbind(0)))
        results += [(d, loss[i], applied[i]) for i, (d, _, _) in enumerate(group)]
    if not results:
        return None
    values = torch.stack([t.to(reference.dtype) for _, loss, applied in results for t in (loss, applied)]).tolist()
    losses, diverged = [], []
    for (d, _, _), loss, applied in zip(results, values[::2], values[1::2], strict=True):
        if not applied:
            d.skipped_updates += 1
            diverged.append((d.dim, loss))
        if math.isfinite(loss):
            losses.append(loss)
    if diverged and on_divergence == "raise":
        dim, loss = diverged[0]
        raise DecorrelationDiverged(
            f"the decorrelation update of a {dim}x{dim} R diverged (loss {loss:.3g}); R left unchanged"
            + (f" ({len(diverged)} R in all)" if len(diverged) > 1 else "")
        )
    return sum(losses) / len(losses) if losses else None


_BATCH_BYTES = 64 * 2**20
"""The most bytes one stack of R takes in a batched update (every 768 x 768 R of ViT-B in one; fc2's 3072 x 3072, a
GEMM big enough on its own, one at a time)."""


def _equal_shaped_groups(updates: list) -> list[list]:
    """`(module, X or None, rows or None)` grouped by what can be stacked: R's shape, dtype and device, and the form
    of the statistics (X, or as many rows); each group at most `_BATCH_BYTES` of R."""
    groups: dict = {}
    for update in updates:
        d, second_moment, rows = update
        key = (d.R.shape, d.R.dtype, d.R.device, None if second_moment is not None else rows.shape)
        if d.is_block_diagonal:  # its blocks are already one batched update
            key = id(d)
        groups.setdefault(key, []).append(update)
    chunks = []
    for group in groups.values():
        size = max(1, _BATCH_BYTES // (group[0][0].R.numel() * group[0][0].R.element_size()))
        chunks += [group[i : i + size] for i in range(0, len(group), size)]
    return chunks
