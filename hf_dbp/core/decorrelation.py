"""One decorrelating matrix `R` ([`Decorrelation`]) and its update rule ([`update_rule`]).

A decorrelated layer computes `y = W (R x) + b`. `R` is not trained by the gradient: after each optimizer step it
takes its own step from the second moments of `z = R x` seen in the training forwards since the previous step::

    X = z^T z / n                        (uncentred second moment, one row per token)
    C = X - diag(X)                      (off-diagonal part: the correlations)
    v = mean over rows of (z * z - 1)    (distance of each variance from 1)
    R <- R - lr * [(1 - kappa) C R + kappa diag(v) R]

The layers that read their input through an `R` are in [`hf_dbp.core.layers`]; the step over many `R`, with
the statistics of all processes combined, in [`hf_dbp.core.step`].
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_block_size
from .sampling import RowSampler, as_row_sampler


def is_recomputing_forward() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing re-runs a forward.

    Both checkpoint flavours (re-entrant and not) recompute inside the autograd engine, where the graph-task id is set.
    A recomputed forward sees the same rows again, so its statistics must not be counted twice. torch offers no public
    query for this; `torch.utils.checkpoint` itself relies on the same private call. A compiled graph never re-runs
    the Python of a forward (checkpointed regions are recomputed inside its backward graph), and the call does not
    trace, so under `torch.compile` the answer is False.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def deepspeed_zero_init_active() -> bool:
    """Whether modules are being built inside DeepSpeed's `zero.Init` (which partitions their parameters as they
    are made); False where DeepSpeed is not imported."""
    partitioning = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return partitioning is not None and getattr(partitioning, "zero_init_context", 0) > 0


def block_width(dim: int, block_size: int | None) -> int:
    """The width of the diagonal blocks of a block-diagonal R for inputs of width `dim`: the largest divisor of `dim`
    not above `block_size` (blocks must tile the width exactly), or `dim` itself (one block: a full R) for `None` or a
    `block_size` of at least `dim`."""
    if block_size is None or block_size >= dim:
        return dim
    return max(b for b in range(1, block_size + 1) if dim % b == 0)


def identity_like(R: torch.Tensor) -> torch.Tensor:
    """The identity of R's shape: `(d, d)`, or `(blocks, b, b)` for a block-diagonal R."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return eye.expand(R.shape).clone()


def multiply_transposed(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """`x R^T` over the last dimension of `x` (`z = R x` for rows x, and `dW = dF R^T` for a fold's gradient), where
    `R` is one `(d, d)` matrix or the `(blocks, b, b)` diagonal blocks of a block-diagonal one."""
    if R.dim() == 2:
        return F.linear(x, R)
    blocks = x.unflatten(-1, R.shape[:2])  # (..., blocks, b): each block of the row meets its own R
    return torch.einsum("...ib,icb->...ic", blocks, R).flatten(-2)


def multiply(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """`W R` for a `(d_out, d)` weight: the folded weight, one `d_out x b x b` product per block when R is
    block-diagonal (`d_out x d x b` in all, against `d_out x d^2` for a full R)."""
    if R.dim() == 2:
        return W @ R
    return torch.einsum("oib,ibc->oic", W.unflatten(-1, R.shape[:2]), R).flatten(-2)


class Decorrelation(nn.Module):
    """A decorrelating matrix `R` for inputs of width `dim` and the statistics of its outputs.

    Args:
        dim (`int`): width of the input rows (`in_features` of a linear layer, `C * p * p` of a patch conv).
        sample_fraction (`float`, defaults to 0.1): fraction of the rows of each training forward used for the
            statistics, drawn without replacement; `1.0` uses every row exactly once. The forward itself always
            decorrelates every row.
        generator (`RowSampler` or `torch.Generator`, *optional*): random source for the subsample, of its own so
            that sampling rows does not move the global RNG (which drives masking and dropout) and BP and DBP runs with
            one seed see the same masks. A `torch.Generator` is turned into a [`~hf_dbp.core.sampling.RowSampler`] from its current
            state. Without one, the global RNG is used.
        block_size (`int`, *optional*): make R block-diagonal, with blocks of `block_width(dim, block_size)` (the
            largest divisor of `dim` not above `block_size`): R is then stored as its `(dim / b, b, b)` blocks, each
            decorrelating its own `b` inputs, and its fold, statistics and update cost `b / dim` of a full R's.
            `None` (default): a full `(dim, dim)` R.

    `R` is a float32 `nn.Parameter`: it is saved and loaded with the model and moves with `.to()`, and DDP does
    not re-broadcast it at every forward as it would a buffer. The statistics are plain tensors, not buffers, for the
    same reason: every process keeps its own until the decorrelation step combines them ([`hf_dbp.core.step`]).
    Under DeepSpeed `R` is a buffer instead, under the same state-dict key (`hf_dbp.prepare_for_deepspeed`, and
    when built inside ZeRO-3's `zero.Init`): DeepSpeed partitions and optimises parameters, never buffers, and does
    not re-broadcast buffers.

    `R` is never trained by the gradient, by two guarantees that do not depend on each other:

    - every forward and fold reads `R.detach()`, so no gradient ever reaches `R`, whatever its `requires_grad`
      says (a user's `model.requires_grad_(True)`, an optimizer over `model.parameters()`: torch's optimizers skip a
      parameter whose `grad` is `None`, weight decay included);
    - every assignment of `R` clears its `requires_grad` (see `register_parameter`), so optimizers built from
      the trainable parameters (Trainer, PEFT-style code) leave it out. transformers' loader assigns each loaded
      tensor as a new `nn.Parameter(requires_grad=True)`; this is where that is undone, for every load path.
    """

    def __init__(
        self,
        dim: int,
        sample_fraction: float = 0.1,
        generator: RowSampler | torch.Generator | None = None,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
        check_block_size(block_size)
        self.dim = dim
        self.block_width = block_width(dim, block_size)
        self.sample_fraction = sample_fraction
        self.generator = as_row_sampler(generator)
        blocks = dim // self.block_width
        shape = (dim, dim) if blocks == 1 else (blocks, self.block_width, self.block_width)
        if deepspeed_zero_init_active():
            # Built inside DeepSpeed's `zero.Init` (transformers' from_pretrained under ZeRO-3), a parameter would be
            # partitioned, and in 16 bits; a buffer is neither (hf_dbp.prepare_for_deepspeed). The constructors there
            # make every new float tensor in the 16-bit dtype: the identity survives the round trip exactly.
            self.register_buffer("R", identity_like(torch.empty(shape)).float())
        else:
            self.R = nn.Parameter(identity_like(torch.empty(shape, dtype=torch.float32)), requires_grad=False)
        self.skipped_updates = 0  # updates refused by the guard of `update_rule`
        self.steps = 0  # optimizer steps taken (`update_decorrelations`); keys the folded-weight caches
        # Whether training forwards share one cached W R between optimizer steps (set it under gradient accumulation;
        # DBPTrainer does).
        self.reuse_fold_in_training = False
        # With the fold reused: a function that says whether the running micro-batch is the last of its optimizer
        # step. The layers then sum the gradient of their fold over the others and map it to W once, in the last
        # (hf_dbp.core.layers._FoldedForward; `hf_dbp.core.model.defer_weight_gradients`). None: every backward
        # gives W its gradient.
        self.is_last_micro_batch: Callable[[], bool] | None = None
        # Set by `inject_decorrelation`: the layers reading z, and their outputs together (what folding costs).
        self.consumers = 1
        self.group_out_features = dim
        self._shared: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (x, z = R x, uses left) of this forward
        self.reset_statistics()

    def extra_repr(self) -> str:
        blocks = f", block_width={self.block_width}" if self.block_width != self.dim else ""
        return f"dim={self.dim}, sample_fraction={self.sample_fraction}{blocks}"

    @property
    def is_block_diagonal(self) -> bool:
        """Whether R is stored as diagonal blocks `(dim / b, b, b)` rather than one `(dim, dim)` matrix."""
        return self.R.dim() == 3

    def is_identity(self) -> bool:
        """Whether R is (still) exactly the identity."""
        return torch.equal(self.R, identity_like(self.R))

    def row_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """Rows `z` `(n, dim)` of a block-diagonal R as each block's slice of them, `(dim / b, n, b)`."""
        return z.unflatten(-1, self.R.shape[:2]).transpose(0, 1)

    def second_moment(self, z: torch.Tensor) -> torch.Tensor:
        """`z^T z` of rows `z` `(n, dim)`, as R's update needs it: `(dim, dim)`, or its diagonal blocks
        `(dim / b, b, b)` for a block-diagonal R (the rest never enters the update)."""
        if not self.is_block_diagonal:
            return z.t() @ z
        blocks = self.row_blocks(z)
        return blocks.mT @ blocks

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)`, `.half()`: R follows the model's device but never drops below float32, as when
        # transformers loads a model in half precision (`_keep_in_fp32_modules_strict`): in 16 bits the small steps of
        # its update would round away. (`.double()` is allowed.) fn runs once on R, a d x d copy, to learn the device.
        def never_below_float32(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            lower = moved.is_floating_point() and tensor.is_floating_point() and torch.finfo(moved.dtype).bits < 32
            return tensor.to(device=moved.device) if lower else moved

        return super()._apply(never_below_float32, recurse)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # `module.R = parameter` (nn.Module.__setattr__), `load_state_dict(assign=True)` and transformers' loaders all
        # end here. R is updated by the decorrelation step (`update_rule`), never by an optimizer.
        if name == "R" and param is not None:
            param.requires_grad_(False)
        super().register_parameter(name, param)

    def reset_statistics(self) -> None:
        self.sum_zz: torch.Tensor | None = None  # sum over rows of z^T z, (dim, dim) or its (blocks, b, b) blocks
        self.sampled_rows: list[torch.Tensor] = []  # the rows z themselves, for the cheaper form of the update
        self.num_rows = 0

    @torch.no_grad()
    def observe(self, rows: torch.Tensor) -> None:
        """Add the statistics of `z = R x` for (a random subset of) `rows` of shape `(n, dim)`."""
        n = rows.shape[0]
        if n == 0:
            return
        if self.sample_fraction < 1.0:
            k = max(1, round(n * self.sample_fraction))
            if self.generator is None:
                index = torch.randperm(n, device=rows.device)[:k]
            else:
                index = self.generator.sample(n, k, like=rows)
            rows = rows.index_select(0, index)
        # Statistics and R stay in R's precision (float32) whatever autocast does to the forward.
        with torch.autocast(device_type=rows.device.type, enabled=False):
            z = multiply_transposed(rows.detach().to(self.R.dtype), self.R)
        self.sampled_rows.append(z)
        self.num_rows += z.shape[0]
        # While the rows are few (2 n < b, b the width of R's blocks, d for a full R) the update is cheapest from the
        # rows themselves; past that, X = z^T z is the cheaper form and a d x d sum bounds the memory, so the rows are
        # folded into it.
        if 2 * sum(r.shape[0] for r in self.sampled_rows) >= self.block_width:
            self._fold_rows_into_sum()

    def _fold_rows_into_sum(self) -> None:
        """Move the rows kept so far into `sum_zz` (from then on the statistics are the d x d sum)."""
        if self.sampled_rows:
            with torch.autocast(device_type=self.R.device.type, enabled=False):
                zz = self.second_moment(torch.cat(self.sampled_rows))
            self.sum_zz = zz if self.sum_zz is None else self.sum_zz.add_(zz)
            self.sampled_rows = []

    def second_moment_sum(self) -> torch.Tensor | None:
        """The sum over the rows seen since the last step of z^T z (d x d, or its diagonal blocks), or None before any
        row; the module's statistics are left as they are."""
        if not self.sampled_rows:
            return self.sum_zz
        with torch.autocast(device_type=self.R.device.type, enabled=False):
            zz = self.second_moment(torch.cat(self.sampled_rows))
        return zz if self.sum_zz is None else self.sum_zz + zz

    def take_statistics(self) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """The statistics since the last step, as (row count, sum of z^T z or None, rows or None), and reset them:
        the rows while they are kept (few: the update is cheapest from them), else the d x d sum (of a block-diagonal
        R: its `(blocks, b, b)` diagonal blocks)."""
        if self.sum_zz is not None:
            self._fold_rows_into_sum()
            statistics = (self.num_rows, self.sum_zz, None)
        else:
            statistics = (self.num_rows, None, torch.cat(self.sampled_rows) if self.sampled_rows else None)
        self.reset_statistics()
        return statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`z = R x` applied to the last dimension of `x` (differentiable in `x` only)."""
        return multiply_transposed(x, self.R.detach().to(x.dtype))

    def fold_into(self, weight: torch.Tensor) -> torch.Tensor:
        """`W R` for a `(d_out, dim)` weight (differentiable in W only), in W's dtype."""
        return multiply(weight, self.R.detach().to(weight.dtype))

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`z = R x`, computed once for all the layers of a group that read the same `x` in one forward (q, k, v).

        The pair is kept only until the last consumer has read it, so no activation outlives its forward.
        """
        shared = self._shared
        if shared is not None and shared[0] is x:
            z, uses_left = shared[1], shared[2] - 1
        else:
            z, uses_left = self(x), self.consumers - 1
        self._shared = (x, z, uses_left) if uses_left > 0 else None
        return z


@torch.no_grad()
def update_rule(
    R: torch.Tensor,
    second_moment: torch.Tensor | None,
    rows: torch.Tensor | None,
    lr: float,
    kappa: float,
    max_loss: float = math.inf,
    variance_form: str = "rows",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DBP update of `R` in place, guarded, from `X = z^T z / n` or from the `n` rows `z` themselves.

    `R` is one `(d, d)` matrix, or a stack `(B, d, d)` of equal-shaped ones updated together (`second_moment`
    `(B, d, d)` or `rows` `(B, n, d)`); the loss and the guard's decision then come per matrix, shape `(B,)`.
    Computed in R's precision also where the caller runs it inside autocast (a training loop whose whole step is
    under `torch.autocast`).
    """
    with torch.autocast(device_type=R.device.type, enabled=False):
        return _update_rule(R, second_moment, rows, lr, kappa, max_loss, variance_form)


def _update_rule(R, second_moment, rows, lr, kappa, max_loss, variance_form):
    batched = R.dim() == 3
    matrix_dims = (-2, -1) if batched else None  # one 2-D R reduces as before: the same bits as one R always had
    if second_moment is not None:
        second_moment = second_moment.to(R.dtype)
        variance = torch.diagonal(second_moment, dim1=-2, dim2=-1)
        squared_sum = (
            torch.linalg.vector_norm(second_moment, dim=matrix_dims) ** 2
        )  # sum of X_ij^2, no d x d temporary
    else:
        n = rows.shape[-2]
        variance = rows.pow(2).sum(-2) / n
        squared_sum = torch.linalg.vector_norm(rows @ rows.mT, dim=matrix_dims) ** 2 / n**2  # ||z^T z|| = ||z z^T||
    v = variance - 1.0  # mean over rows of (z*z - 1) is the diagonal of X minus one
    off_diagonal = squared_sum - variance.pow(2).sum(-1)
    loss = ((1.0 - kappa) * off_diagonal + kappa * v.pow(2).sum(-1)) / R.shape[-1] ** 2
    if lr == 0.0:
        return loss, torch.ones(loss.shape, dtype=torch.bool, device=R.device)
    # R - lr [(1 - kappa) (X - diag X) R + kappa diag(v) R]
    #   = diag(1 - lr (kappa v - (1 - kappa) diag X)) R - lr (1 - kappa) X R.
    # diag(v) @ R scales the rows of R, normalising the variance of each output z_i. The reference code's `v * R`
    # scales columns instead, R diag(v); the two agree only while R commutes with diag(v) (e.g. R diagonal, as at
    # the first step from R = I). A symmetric R is not enough.
    # One d x d temporary, written once and finished by a single fused GEMM (addmm_), then one pass to check it
    # and one to write it back: the d x d passes, not the arithmetic, dominate the step of fc2's 3072 x 3072 R.
    if variance_form == "rows":
        new_r = R * (1.0 - lr * (kappa * v - (1.0 - kappa) * variance))[..., :, None]
    else:  # R diag(v): one more d x d pass, scaling the columns
        new_r = R * (1.0 + lr * (1.0 - kappa) * variance)[..., :, None]
        new_r.addcmul_(R, v[..., None, :], value=-lr * kappa)
    fused = new_r.baddbmm_ if batched else new_r.addmm_
    if second_moment is not None:
        fused(second_moment, R, alpha=-lr * (1.0 - kappa))
    else:
        fused(rows.mT, rows @ R, alpha=-lr * (1.0 - kappa) / rows.shape[-2])
    # A sum is finite only if every entry is (NaN and inf propagate), and needs no d x d mask. The decision stays
    # on the device (torch.where, not an `if`): no host sync per R.
    applied = torch.isfinite(loss) & (loss <= max_loss) & torch.isfinite(new_r.sum(dim=matrix_dims))
    torch.where(applied[..., None, None] if batched else applied, new_r, R, out=R)
    return loss, applied
