"""Decorrelated backpropagation (DBP): the math, independent of any particular model.

A decorrelated layer keeps a square matrix ``R`` (``d x d``, ``d`` = the layer's input width) in front of its
weight and computes ``y = W (R x) + b``. ``R`` is not trained by the gradient: after each optimizer step it takes
its own step from the second moments of ``z = R x`` seen in the training forwards since the previous step
(see ``../shared/METHOD.md``)::

    X = z^T z / n                        (uncentred second moment, one row per token)
    C = X - diag(X)                      (off-diagonal part: the correlations)
    v = mean over rows of (z * z - 1)    (distance of each variance from 1)
    R <- R - lr * [(1 - kappa) C R + kappa diag(v) R]

This module holds three things, in the spirit of PEFT's tuners:

- :class:`Decorrelation`: one ``R`` with the statistics of its outputs and the update rule.
- :class:`DecorrelatedLinear` / :class:`DecorrelatedConv2d`: drop-in replacements for ``nn.Linear`` and a
  patchifying ``nn.Conv2d`` that keep the parameter names of the layer they replace (so checkpoints of the plain
  model load unchanged) and read their ``R`` from a :class:`Decorrelation` that several of them may share
  (q, k and v read the same input, so one ``R`` serves all three).
- :func:`inject_decorrelation`, :func:`attach_decorrelation_monitor`, :func:`decorrelation_step` and
  :func:`fold_decorrelation`: wrap the layers a plan names, measure the same statistics on an unchanged model (the
  BP baseline), take one update of every ``R`` (combining the statistics of all processes, see
  :mod:`hf_dbp.core.collectives`), and fold ``R`` into the weights.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .collectives import StatisticsExchange, resolve_transfer_dtype


def _in_backward_pass() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing re-runs a forward.

    Both checkpoint flavours (re-entrant and not) recompute inside the autograd engine, where the graph-task id is set.
    A recomputed forward sees the same rows again, so its statistics must not be counted twice. torch offers no public
    query for this; ``torch.utils.checkpoint`` itself relies on the same private call. A compiled graph never re-runs
    the Python of a forward (checkpointed regions are recomputed inside its backward graph), and the call does not
    trace, so under ``torch.compile`` the answer is False.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


# Why a custom op: the rows for R's statistics come from a generator of their own, so that sampling them leaves the
# global RNG (masking, dropout) alone and BP and DBP runs draw the same masks. torch.compile cannot trace a
# torch.Generator argument (a graph break in every decorrelated forward) and replaces global-RNG calls with its own
# seeds, which would change the masks. An opaque op that reads and advances the generator's state, held in a tensor,
# traces without a break and draws exactly what the eager generator would. Guarded so that the module can be loaded
# twice (as hf_dbp and as a checkpoint's remote code) in one process.
if hasattr(torch.ops, "hf_dbp") and hasattr(torch.ops.hf_dbp, "sample_rows"):
    _sample_rows = torch.ops.hf_dbp.sample_rows
else:

    @torch.library.custom_op("hf_dbp::sample_rows", mutates_args=("generator_state",))
    def _sample_rows(num_rows: int, num_samples: int, generator_state: torch.Tensor) -> torch.Tensor:
        """``num_samples`` distinct row indices out of ``num_rows``, advancing the generator state in place."""
        generator = torch.Generator()
        generator.set_state(generator_state)
        index = torch.randperm(num_rows, generator=generator, device="cpu")[:num_samples]
        generator_state.copy_(generator.get_state())
        return index

    @_sample_rows.register_fake
    def _(num_rows: int, num_samples: int, generator_state: torch.Tensor) -> torch.Tensor:
        return torch.empty(num_samples, dtype=torch.long, device="cpu")


# On an accelerator the indices are drawn there: a CPU draw would be copied to the device in every decorrelated
# forward, and a copy from pageable host memory waits for the device. The state stays the CPU generator's (so
# checkpoints and resuming are unchanged): each draw takes one seed from it, on the host, and permutes on the device
# with a generator seeded by it. Reproducible on one kind of device; a GPU draws other rows than the CPU.
if hasattr(torch.ops, "hf_dbp") and hasattr(torch.ops.hf_dbp, "sample_rows_on_device"):
    _sample_rows_on_device = torch.ops.hf_dbp.sample_rows_on_device
else:

    @torch.library.custom_op("hf_dbp::sample_rows_on_device", mutates_args=("generator_state",))
    def _sample_rows_on_device(
        like: torch.Tensor, num_rows: int, num_samples: int, generator_state: torch.Tensor
    ) -> torch.Tensor:
        """``num_samples`` distinct row indices out of ``num_rows``, on ``like``'s device; advances the state."""
        generator = torch.Generator()
        generator.set_state(generator_state)
        seed = int(torch.randint(0, 2**62, (), generator=generator))  # a CPU tensor: no device is read
        generator_state.copy_(generator.get_state())
        device_generator = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randperm(num_rows, generator=device_generator, device=like.device)[:num_samples]

    @_sample_rows_on_device.register_fake
    def _(like: torch.Tensor, num_rows: int, num_samples: int, generator_state: torch.Tensor) -> torch.Tensor:
        return torch.empty(num_samples, dtype=torch.long, device=like.device)


class RowSampler:
    """A CPU random generator for the rows of R's statistics that ``torch.compile`` traces without a graph break.

    It draws the same sequence as a ``torch.Generator`` with the same state and has its ``manual_seed``,
    ``get_state`` and ``set_state``, so checkpoints save and restore it the same way. Several
    :class:`Decorrelation` modules share one sampler, as they would share one generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        self.state = generator.get_state()

    @classmethod
    def from_generator(cls, generator: torch.Generator) -> RowSampler:
        """A sampler that continues from ``generator``'s current state (the generator itself does not advance)."""
        sampler = cls()
        sampler.set_state(generator.get_state())
        return sampler

    def manual_seed(self, seed: int) -> RowSampler:
        self.state.copy_(torch.Generator().manual_seed(seed).get_state())
        return self

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        self.state.copy_(state)

    def sample(self, num_rows: int, num_samples: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """``num_samples`` distinct indices out of ``num_rows``, a long tensor on ``like``'s device (default CPU)."""
        if like is None or like.device.type == "cpu":
            return _sample_rows(num_rows, num_samples, self.state)
        return _sample_rows_on_device(like, num_rows, num_samples, self.state)


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # torch.Generator -> its RowSampler


def as_row_sampler(generator: RowSampler | torch.Generator | None) -> RowSampler | None:
    """``generator`` as a :class:`RowSampler`.

    A ``torch.Generator`` is converted once, from its state at the first call: every later call with the same
    generator returns the same sampler, so modules built from one generator still draw from one sequence (the
    generator itself no longer advances).
    """
    if generator is None or (hasattr(generator, "sample") and hasattr(generator, "get_state")):
        return generator  # a RowSampler, also one from another copy of this module (remote code)
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"the generator for the statistics' rows must be a CPU generator, got {generator.device}")
        if generator not in _SAMPLERS:
            _SAMPLERS[generator] = RowSampler.from_generator(generator)
        return _SAMPLERS[generator]
    raise TypeError(f"generator must be a RowSampler, a torch.Generator or None, got {type(generator).__name__}")


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows that ``R`` acts on for the input ``x`` of ``layer``: one row per token (Linear) or per patch (Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        # A patchifying conv (kernel == stride, no padding) applies W to each flattened C x p x p patch, flattened in
        # the same (channel, row, column) order as the conv's weight.
        patches = F.unfold(x, kernel_size=layer.kernel_size, stride=layer.stride)  # (B, C*p*p, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


VARIANCE_FORMS = ("rows", "columns")
"""Where the update puts the variance term ``kappa * v``: ``"rows"``, ``diag(v) R`` (the method's rule, which
normalises the variance of each output ``z_i``), or ``"columns"``, ``R diag(v)`` (what the reference code
artcogsys/decorbp computes with ``v * R``, for reproducing it exactly)."""


class Decorrelation(nn.Module):
    """A decorrelating matrix ``R`` for inputs of width ``dim`` and the statistics of its outputs.

    Args:
        dim (`int`): width of the input rows (``in_features`` of a linear layer, ``C * p * p`` of a patch conv).
        sample_fraction (`float`, defaults to 0.1): fraction of the rows of each training forward used for the
            statistics, drawn without replacement; ``1.0`` uses every row exactly once. The forward itself always
            decorrelates every row.
        generator (`RowSampler` or `torch.Generator`, *optional*): random source for the subsample, of its own so
            that sampling rows does not move the global RNG (which drives masking and dropout) and BP and DBP runs with
            one seed see the same masks. A ``torch.Generator`` is turned into a :class:`RowSampler` from its current
            state. Without one, the global RNG is used.

    ``R`` is a float32 ``nn.Parameter``: it is saved and loaded with the model and moves with ``.to()``, and DDP does
    not re-broadcast it at every forward as it would a buffer. The statistics are plain tensors, not buffers, for the
    same reason: every process keeps its own until :func:`decorrelation_step` combines them.

    ``R`` is never trained by the gradient, by two guarantees that do not depend on each other:

    - every forward and fold reads ``R.detach()``, so no gradient ever reaches ``R``, whatever its ``requires_grad``
      says (a user's ``model.requires_grad_(True)``, an optimizer over ``model.parameters()``: torch's optimizers skip a
      parameter whose ``grad`` is ``None``, weight decay included);
    - every assignment of ``R`` clears its ``requires_grad`` (see :meth:`register_parameter`), so optimizers built from
      the trainable parameters (Trainer, PEFT-style code) leave it out. transformers' loader assigns each loaded
      tensor as a new ``nn.Parameter(requires_grad=True)``; this is where that is undone, for every load path.
    """

    def __init__(
        self, dim: int, sample_fraction: float = 0.1, generator: RowSampler | torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
        self.dim = dim
        self.sample_fraction = sample_fraction
        self.generator = as_row_sampler(generator)
        self.R = nn.Parameter(torch.eye(dim, dtype=torch.float32), requires_grad=False)
        self.skipped_updates = 0  # updates refused by the guard in `apply_update`
        self.steps = 0  # calls of `decorrelation_step`, one per optimizer step; keys the folded-weight caches
        # Whether training forwards share one cached W R between optimizer steps (set it under gradient accumulation;
        # DBPTrainer does).
        self.reuse_fold_in_training = False
        # Set by `inject_decorrelation`: the layers reading z, and their outputs together (what folding costs).
        self.consumers = 1
        self.group_out_features = dim
        self._shared: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (x, z = R x, uses left) of this forward
        self.reset_statistics()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, sample_fraction={self.sample_fraction}"

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
        # end here. R is updated by `apply_update`, never by an optimizer.
        if name == "R" and param is not None:
            param.requires_grad_(False)
        super().register_parameter(name, param)

    def reset_statistics(self) -> None:
        self.sum_zz: torch.Tensor | None = None  # sum over rows of z^T z, (dim, dim)
        self.sampled_rows: list[torch.Tensor] = []  # the rows z themselves, for the cheaper form of the update
        self.num_rows = 0

    @torch.no_grad()
    def observe(self, rows: torch.Tensor) -> None:
        """Add the statistics of ``z = R x`` for (a random subset of) ``rows`` of shape ``(n, dim)``."""
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
            z = rows.detach().to(self.R.dtype) @ self.R.t()
        self.sampled_rows.append(z)
        self.num_rows += z.shape[0]
        # While the rows are few (2 n < d) the update is cheapest from the rows themselves; past that, X = z^T z is
        # the cheaper form and a d x d sum bounds the memory, so the rows are folded into it.
        if 2 * sum(r.shape[0] for r in self.sampled_rows) >= self.dim:
            self.moment_sum()

    def moment_sum(self) -> torch.Tensor | None:
        """The sum over the rows seen so far of z^T z (d x d), folding any pending rows into it."""
        if self.sampled_rows:
            with torch.autocast(device_type=self.R.device.type, enabled=False):
                z = torch.cat(self.sampled_rows)
                zz = z.t() @ z
            self.sum_zz = zz if self.sum_zz is None else self.sum_zz.add_(zz)
            self.sampled_rows = []
        return self.sum_zz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``z = R x`` applied to the last dimension of ``x`` (differentiable in ``x`` only)."""
        return F.linear(x, self.R.detach().to(x.dtype))

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``z = R x``, computed once for all the layers of a group that read the same ``x`` in one forward (q, k, v).

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
    def apply_update(
        self,
        second_moment: torch.Tensor | None,
        lr: float,
        kappa: float,
        max_loss: float = math.inf,
        rows: torch.Tensor | None = None,
        variance_form: str = "rows",
    ) -> float:
        """One DBP step from the second moment ``X = z^T z / n`` or from the ``n`` rows ``z`` themselves.

        ``variance_form`` places the variance term: ``"rows"`` (``diag(v) R``, the update rule of the method) or
        ``"columns"`` (``R diag(v)``, what the reference code's ``v * R`` computes); see :data:`VARIANCE_FORMS`.

        Returns the decorrelation loss of ``X``. Given ``rows`` (and no ``second_moment``), ``X`` is never formed:
        ``X R = z^T (z R) / n`` costs ``2 n d^2`` where ``X @ R`` costs ``d^3`` (fc2 of ViT-B: d = 3072, n ~ 160
        rows), and the loss comes from the ``n x n`` Gram matrix.

        With ``lr == 0`` nothing changes and only the loss is computed (used to monitor a BP model). An update that
        would make R non-finite, or that comes from a loss that is not finite or above ``max_loss`` (the statistics
        exploded), is refused: R stays as it was and ``skipped_updates`` counts it.
        """
        loss, applied = self.update(second_moment, lr, kappa, max_loss, rows, variance_form)
        loss, applied = torch.stack([loss, applied.to(loss.dtype)]).tolist()
        self.skipped_updates += int(not applied)
        return loss

    @torch.no_grad()
    def update(
        self,
        second_moment: torch.Tensor | None,
        lr: float,
        kappa: float,
        max_loss: float = math.inf,
        rows: torch.Tensor | None = None,
        variance_form: str = "rows",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`apply_update` without reading the device: returns the loss and whether R was updated, as 0-d
        tensors on R's device (``skipped_updates`` is left to the caller). The guard decides on the device, so a
        step over many R reads the device once, for all of them (:func:`decorrelation_step`)."""
        if variance_form not in VARIANCE_FORMS:
            raise ValueError(f"variance_form must be one of {VARIANCE_FORMS}, got {variance_form!r}")
        return update_rule(self.R, second_moment, rows, lr, kappa, max_loss, variance_form)


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
    """The DBP update of ``R`` in place, guarded, from ``X`` or the rows: :meth:`Decorrelation.update`'s arithmetic.

    ``R`` is one ``(d, d)`` matrix, or a stack ``(B, d, d)`` of equal-shaped ones updated together (``second_moment``
    ``(B, d, d)`` or ``rows`` ``(B, n, d)``); the loss and the guard's decision then come per matrix, shape ``(B,)``.
    """
    batched = R.dim() == 3
    matrix_dims = (-2, -1) if batched else None  # one 2-D R reduces as before: the same bits as one R always had
    if second_moment is not None:
        second_moment = second_moment.to(R.dtype)
        variance = torch.diagonal(second_moment, dim1=-2, dim2=-1)
        squared_sum = torch.linalg.vector_norm(second_moment, dim=matrix_dims) ** 2  # sum of X_ij^2, no d x d temporary
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


def _rebase(layer: nn.Module, cls: type, decorrelation: Decorrelation, record_statistics: bool) -> nn.Module:
    """A ``cls`` with the hyper-parameters, parameters and hooks of ``layer`` (shared, not copied)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in layer.__dict__.items()})
    new.record_statistics = record_statistics
    new._folded_cache = None
    object.__setattr__(new, "decorrelation", decorrelation)  # a reference, not a registered sub-module
    return new


def _fold_in_weight_precision(layer: nn.Module) -> torch.Tensor:
    """``layer.fold()`` outside autocast, so that W R keeps W's precision; a forward under autocast casts it as it
    would W."""
    with torch.autocast(device_type=layer.weight.device.type, enabled=False):
        return layer.fold()


def _cached_fold(layer: nn.Module) -> torch.Tensor:
    """``W R`` without a graph, computed once and reused while neither W nor R changes.

    One fold serves every forward between two optimizer steps: all the micro-batches of a gradient-accumulation step
    and every evaluation batch. The cache is keyed on the version counters of W and R (the optimizer's and DBP's
    in-place updates bump them), on their storage, and on the count of DBP steps, which changes after every optimizer
    step even where a sharded optimizer (FSDP) writes W's storage behind its version counter.
    """
    if torch.is_inference_mode_enabled():  # an inference tensor could not be saved for a later backward
        return _fold_in_weight_precision(layer)
    R = layer.decorrelation.R
    key = (layer.weight._version, R._version, layer.weight.data_ptr(), R.data_ptr(), layer.decorrelation.steps)
    cached = layer._folded_cache
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = layer._folded_cache = (key, _fold_in_weight_precision(layer))
    return cached[1]


class _FoldedForward(torch.autograd.Function):
    """A linear layer or patchifying conv run with a precomputed folded weight ``F = W R``, differentiable in W.

    Why by hand: autograd would need ``W @ R`` inside every micro-batch's graph to reach W, costing ``d_out * d^2``
    per micro-batch in the forward. Here ``F`` comes from the cache (once per optimizer step) and the backward turns
    the gradient of ``F`` into that of W: ``dW = dF R^T``, exactly what autograd computes for ``W @ R``.
    """

    @staticmethod
    def forward(x, weight, bias, R, folded, stride):
        if stride is None:
            return F.linear(x, folded, bias)
        return F.conv2d(x, folded, bias, stride)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, R, folded, stride = inputs
        ctx.stride = stride
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        # Under autocast the forward computed in the output's dtype; the backward does the same. x serves dW only.
        ctx.save_for_backward(x if weight.requires_grad else None, R, folded.to(output.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable  # the fold is a constant here: no second derivatives through W
    def backward(ctx, grad_output):
        x, R, folded = ctx.saved_tensors
        grad_output = grad_output.to(folded.dtype)
        x = x.to(folded.dtype) if x is not None else None
        grad_x = grad_weight = grad_bias = None
        if ctx.stride is None:
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            if ctx.needs_input_grad[0]:
                grad_x = grad_output @ folded
            if ctx.needs_input_grad[1]:
                grad_folded = flat_grad.t() @ x.reshape(-1, x.shape[-1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = flat_grad.sum(0)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, folded, grad_output, stride=ctx.stride)
            if ctx.needs_input_grad[1]:
                grad_folded = torch.nn.grad.conv2d_weight(x, folded.shape, grad_output, stride=ctx.stride)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum((0, 2, 3))
        if ctx.needs_input_grad[1]:
            # F = W R with W flattened to (d_out, d) for the conv: dW = dF R^T, in R's precision.
            flat = grad_folded.reshape(grad_folded.shape[0], -1).to(R.dtype)
            grad_weight = (flat @ R.t()).reshape(grad_folded.shape)
        return grad_x, grad_weight, grad_bias, None, None, None


def _folded_forward(layer: nn.Module, x: torch.Tensor, stride: tuple[int, int] | None) -> torch.Tensor:
    """The layer's output from ``W R``.

    Without gradients (evaluation), the cached fold. With them, the cached fold through :class:`_FoldedForward` when
    the layer's ``Decorrelation.reuse_fold_in_training`` is set (gradient accumulation: one fold serves every
    micro-batch), otherwise a fold inside the graph (one forward per step: nothing to reuse, and the graph frees each
    fold as the backward passes it, where a cached one would stay in memory to the end of the step).
    """
    needs_grad = torch.is_grad_enabled() and (layer.weight.requires_grad or x.requires_grad)
    # A compiled graph cannot key a cache on version counters: it folds inside the graph, and autograd differentiates
    # ``W @ R`` itself, as it does for one forward per optimizer step.
    if torch.compiler.is_compiling() or (needs_grad and not layer.decorrelation.reuse_fold_in_training):
        folded = _fold_in_weight_precision(layer)
    else:
        folded = _cached_fold(layer)
        if needs_grad:
            return _FoldedForward.apply(x, layer.weight, layer.bias, layer.decorrelation.R.detach(), folded, stride)
    if stride is None:
        return F.linear(x, folded, layer.bias)
    return layer._conv_forward(x, folded, layer.bias)


class DecorrelatedLinear(nn.Linear):
    """``nn.Linear`` computing ``W (R x) + b`` with ``R`` taken from a (possibly shared) :class:`Decorrelation`.

    Parameter names are those of ``nn.Linear`` (``weight``, ``bias``). ``record_statistics`` is set on one layer of
    each group that shares an ``R``, so that rows read by q, k and v are counted once. The ``Decorrelation`` is held
    as a plain attribute, not a sub-module: its owner registers it once (see :func:`inject_decorrelation`).
    """

    @classmethod
    def from_layer(cls, linear: nn.Linear, decorrelation: Decorrelation, record_statistics: bool) -> DecorrelatedLinear:
        """Wrap ``linear`` without copying: the new layer shares its weight and bias parameters."""
        return _rebase(linear, cls, decorrelation, record_statistics)

    def fold(self) -> torch.Tensor:
        """``W R``, computed now (differentiable in W only)."""
        return self.weight @ self.decorrelation.R.detach().to(self.weight.dtype)

    def folded_weight(self) -> torch.Tensor:
        """``W R``: the weight of a plain linear layer with the same outputs (cached while W and R are unchanged)."""
        return _cached_fold(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record_statistics and not _in_backward_pass():
            self.decorrelation.observe(input_rows(self, x))
        # Two equal forms; pick the cheaper one. Explicit z = R x costs n_rows * d^2 once for the whole group (q, k
        # and v share it); folding costs d_out * d^2 for each layer of the group (both again in backward). So fold
        # when the rows outnumber the group's outputs.
        if x.numel() // self.in_features > self.decorrelation.group_out_features:
            return _folded_forward(self, x, stride=None)
        return F.linear(self.decorrelation.shared_forward(x), self.weight, self.bias)


def is_patchifying(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` cuts its input into disjoint patches (kernel == stride, no padding or dilation, groups=1): only
    then is each output a product of W with one flattened patch, so that R acts on the patches and folds into W."""
    return (conv.kernel_size == conv.stride and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1)
            and conv.groups == 1)  # fmt: skip


class DecorrelatedConv2d(nn.Conv2d):
    """A patchifying ``nn.Conv2d`` (kernel == stride, no padding) with ``R`` acting on each flattened patch.

    The conv has as many outputs per image as patches but only ``out_channels`` rows of weights, so the folded form
    ``(W R)`` is always the cheap one here.
    """

    @classmethod
    def from_layer(cls, conv: nn.Conv2d, decorrelation: Decorrelation, record_statistics: bool) -> DecorrelatedConv2d:
        if not is_patchifying(conv):
            raise ValueError(
                "DecorrelatedConv2d needs a patchifying conv: kernel_size == stride, no padding or dilation, groups=1"
            )
        return _rebase(conv, cls, decorrelation, record_statistics)

    def fold(self) -> torch.Tensor:
        """``W R`` on the flattened patches, reshaped as a conv weight, computed now (differentiable in W)."""
        w = self.weight.reshape(self.out_channels, -1)
        return (w @ self.decorrelation.R.detach().to(w.dtype)).reshape(self.weight.shape)

    def folded_weight(self) -> torch.Tensor:
        """The weight of a plain conv with the same outputs (cached while W and R are unchanged)."""
        return _cached_fold(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record_statistics and not _in_backward_pass():
            self.decorrelation.observe(input_rows(self, x))
        return _folded_forward(self, x, stride=self.stride)


class DecorrelatedConv1D(Conv1D):
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight stored transposed as ``(in, out)``) computing
    ``(R x) W + b``.

    Its folded weight is ``R^T W``, kept in the ``(in, out)`` layout so that it loads into a plain ``Conv1D``. A fused
    projection (GPT-2's ``c_attn``: q, k and v in one matrix) is one layer reading one input: one R.
    """

    @classmethod
    def from_layer(cls, conv: Conv1D, decorrelation: Decorrelation, record_statistics: bool) -> DecorrelatedConv1D:
        return _rebase(conv, cls, decorrelation, record_statistics)

    def fold(self) -> torch.Tensor:
        """``R^T W`` (the ``(in, out)`` weight of a plain ``Conv1D`` with the same outputs), differentiable in W."""
        return self.decorrelation.R.detach().to(self.weight.dtype).t() @ self.weight

    def folded_weight(self) -> torch.Tensor:
        return _cached_fold(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record_statistics and not _in_backward_pass():
            self.decorrelation.observe(input_rows(self, x))
        size_out = x.shape[:-1] + (self.nf,)
        if x.numel() // self.nx > self.decorrelation.group_out_features:
            needs_grad = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
            # Folded inside the graph when training (autograd differentiates R^T W), cached otherwise.
            weight = _fold_in_weight_precision(self) if needs_grad or torch.compiler.is_compiling() else _cached_fold(self)
        else:
            x, weight = self.decorrelation.shared_forward(x), self.weight
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), weight.to(x.dtype)).reshape(size_out)


DECORRELATED_LAYERS = (DecorrelatedLinear, DecorrelatedConv2d, DecorrelatedConv1D)
"""The decorrelated layer classes; each keeps the parameter names of the layer it replaced."""

PLAIN_LAYERS = {DecorrelatedLinear: nn.Linear, DecorrelatedConv2d: nn.Conv2d, DecorrelatedConv1D: Conv1D}
"""The plain class each decorrelated layer class replaced."""


def decorrelation_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Every ``R`` of ``model`` (each once, in module order): what an optimizer must never hold."""
    return [m.R for m in model.modules() if isinstance(m, Decorrelation)]


def drop_decorrelation_matrices(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Remove every ``R`` of ``model`` from ``optimizer``'s parameter groups; returns how many were there.

    For optimizers built by hand from ``model.parameters()``, which hold ``R`` whatever its ``requires_grad``. ``R``
    never gets a gradient, so such an optimizer would not move it; out of the groups it is not even looked at.
    """
    matrices = {id(R) for R in decorrelation_matrices(model)}
    dropped = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in matrices]
        dropped += len(group["params"]) - len(kept)
        group["params"] = kept
    return dropped


def _input_width(layer: nn.Module) -> int:
    if isinstance(layer, Conv1D):
        return layer.nx
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features
    raise TypeError(
        f"cannot decorrelate a {type(layer).__name__}: only nn.Linear, transformers' Conv1D and patchifying nn.Conv2d"
    )


def _output_width(layer: nn.Module) -> int:
    if isinstance(layer, Conv1D):
        return layer.nf
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _wrapper_class(layer: nn.Module) -> type:
    if isinstance(layer, Conv1D):
        return DecorrelatedConv1D
    return DecorrelatedConv2d if isinstance(layer, nn.Conv2d) else DecorrelatedLinear


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


def decorrelation_module_name(group: str) -> str:
    """The name part under which :func:`inject_decorrelation` registers the ``R`` of ``group`` (beside its layers)."""
    return f"{_split(group)[1]}_decorrelation"


def inject_decorrelation(
    root: nn.Module,
    groups: Mapping[str, Sequence[str]],
    sample_fraction: float = 0.1,
    generator: RowSampler | torch.Generator | None = None,
) -> dict[str, Decorrelation]:
    """Decorrelate the inputs of the layers a plan names, in place.

    Args:
        root: the model (or sub-model) holding the layers.
        groups: for each ``R``, its name (a dotted path; the ``Decorrelation`` is registered beside the layers as
            ``<parent>.<leaf>_decorrelation``) and the paths of the layers that read the same input through it.
            Example: ``{"layers.0.attention.qkv": ["layers.0.attention.q_proj", "layers.0.attention.k_proj",
            "layers.0.attention.v_proj"]}``.
        sample_fraction, generator: see :class:`Decorrelation`.

    Returns:
        The new ``Decorrelation`` modules by group name. Each starts at the identity, so the model's outputs are
        unchanged.
    """
    generator = as_row_sampler(generator)  # once, so that every layer draws from the same sequence
    decorrelations = {}
    for name, paths in groups.items():
        layers = [root.get_submodule(p) for p in paths]
        widths = {_input_width(layer) for layer in layers}
        if len(widths) != 1:
            raise ValueError(f"layers {list(paths)} of group {name!r} have different input widths {widths}")
        reference = layers[0].weight
        decorrelation = Decorrelation(widths.pop(), sample_fraction, generator).to(reference.device)
        decorrelation.consumers = len(layers)
        decorrelation.group_out_features = sum(_output_width(layer) for layer in layers)
        root.get_submodule(_split(name)[0]).register_module(decorrelation_module_name(name), decorrelation)
        for i, (path, layer) in enumerate(zip(paths, layers, strict=True)):
            wrapper = _wrapper_class(layer)
            if isinstance(layer, DECORRELATED_LAYERS):
                raise ValueError(f"layer {path!r} is already decorrelated")
            layer_parent, layer_leaf = _split(path)
            new = wrapper.from_layer(layer, decorrelation, record_statistics=i == 0)
            setattr(root.get_submodule(layer_parent), layer_leaf, new)
        decorrelations[name] = decorrelation
    return decorrelations


class DecorrelationMonitor:
    """Measures the decorrelation statistics of a plain model's layers without changing the model.

    Forward hooks on the first layer of each group record the statistics of the layer's input (``R`` stays the
    identity, so ``z = x``); :func:`decorrelation_step` with this monitor's modules reports the same loss a DBP model
    would, without updating anything. Call :meth:`remove` to detach the hooks.
    """

    def __init__(
        self,
        root: nn.Module,
        groups: Mapping[str, Sequence[str]],
        sample_fraction: float = 0.1,
        generator: RowSampler | torch.Generator | None = None,
    ) -> None:
        self.decorrelations: dict[str, Decorrelation] = {}
        self._handles = []
        generator = as_row_sampler(generator)  # once, so that every layer draws from the same sequence
        for name, paths in groups.items():
            layer = root.get_submodule(paths[0])
            decorrelation = Decorrelation(_input_width(layer), sample_fraction, generator).to(layer.weight.device)
            self.decorrelations[name] = decorrelation
            self._handles.append(layer.register_forward_pre_hook(self._hook(decorrelation)))

    @staticmethod
    def _hook(decorrelation: Decorrelation):
        def hook(layer: nn.Module, args: tuple) -> None:
            if layer.training and not _in_backward_pass():
                decorrelation.observe(input_rows(layer, args[0]))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class DecorrelationDiverged(FloatingPointError):
    """Raised by :func:`decorrelation_step` with ``on_divergence="raise"`` instead of skipping an update."""


class PendingStatistics:
    """The statistics of a step, taken out of the modules and (over several processes) being combined."""

    def __init__(self, decorrelations: list[Decorrelation], statistics, exchange=None) -> None:
        self.decorrelations = decorrelations
        self._statistics = statistics
        self._exchange = exchange

    def wait(self) -> list:
        """Per module: (row count, sum of z^T z or None, rows or None), over all processes."""
        if self._exchange is not None:
            self._statistics, self._exchange = self._exchange.wait(), None
        return self._statistics


@torch.no_grad()
def begin_decorrelation_step(
    decorrelations: Iterable[Decorrelation], process_group=None, transfer_dtype: torch.dtype | str | None = None
) -> PendingStatistics:
    """Take the statistics gathered since the last step out of the modules and, under ``torch.distributed``, start
    combining them across processes; pass the result to :func:`decorrelation_step` as ``pending``.

    Called after the last forward of an optimizer step (its last gradient-accumulation micro-batch), the exchange
    runs while the backward and the optimizer step do, off the critical path (:class:`DBPTrainer` does this). Every
    process must call it at the same point, as any collective. Forwards between the two calls must not gather
    statistics (the step refuses them).

    ``transfer_dtype``: ``"bfloat16"`` or ``"float16"`` sends the statistics in 16 bits (half the bytes; R stays the
    same on every process but rounds differently: :mod:`hf_dbp.core.collectives`); ``None`` sends R's float32.
    """
    transfer_dtype = resolve_transfer_dtype(transfer_dtype)  # a bad name fails on one process as on several
    decorrelations = list(decorrelations)
    # Per layer: (count, second-moment sum or None, rows or None). Each layer updates from its rows while they are
    # the cheaper form (few rows: 2 n < d), else from z^T z; over several processes the same rule is applied to all
    # processes' rows together, and only what that form needs travels (hf_dbp.core.collectives).
    statistics = []
    for d in decorrelations:
        if d.sum_zz is not None:
            statistics.append((d.num_rows, d.moment_sum(), None))
        else:
            statistics.append((d.num_rows, None, torch.cat(d.sampled_rows) if d.sampled_rows else None))
        d.reset_statistics()
    if not (decorrelations and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return PendingStatistics(decorrelations, statistics)
    reference = decorrelations[0].R
    # DBPTrainer begins inside the forward's autocast; z^T z formed here for the exchange must keep R's precision.
    with torch.autocast(device_type=reference.device.type, enabled=False):
        exchange = StatisticsExchange([d.dim for d in decorrelations], statistics, reference.device, reference.dtype,
                                      process_group, transfer_dtype)  # fmt: skip
    return PendingStatistics(decorrelations, statistics=None, exchange=exchange)


@torch.no_grad()
def decorrelation_step(
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
    """Update every ``R`` from the statistics gathered since the last call, then clear them.

    ``pending``: what :func:`begin_decorrelation_step` returned for these modules after the step's last forward, so
    that the exchange between processes ran during the backward and the optimizer step.

    When ``torch.distributed`` is initialised, the statistics of all processes are combined first (each layer's
    rows, or the upper triangle of its z^T z, whichever the update needs: see :mod:`hf_dbp.core.collectives`), so
    every process applies the same update to the same ``R`` and the ``R`` stay identical across processes (the guard
    below decides the same way on every process too). ``lr=0`` only measures. The updates never wait for the device:
    the step reads it once, at the end, for every layer's loss and guard decision together.

    Guard: an update that would make an ``R`` non-finite, or whose loss is not finite or above ``max_loss``, is
    skipped and counted in that module's ``skipped_updates`` (``on_divergence="skip"``), or raises
    :class:`DecorrelationDiverged` (``"raise"``, after the other layers were updated) so that a run can stop rather
    than go on.

    ``variance_form``: see :data:`VARIANCE_FORMS`. ``transfer_dtype``: see :func:`begin_decorrelation_step`.

    ``update=False`` takes an optimizer step without a decorrelation update: the statistics are kept (and go on
    accumulating) for the next call that updates, nothing is exchanged, and the layers' folded weights ``W R`` are
    still reformed for the new ``W``. Passing ``update=(step + 1) % k == 0`` updates R every k optimizer steps from
    the statistics of all k, with a k-th of the traffic (:class:`DBPTrainer`: ``--decorrelation_update_every``).

    ``batch_updates``: update equal-shaped R together, a stack at a time (one batched GEMM for many R, up to
    64 MiB per stack), instead of one after the other; ``None`` (the default) batches on accelerators, where each
    small R's update is bound by kernel launches, and not on the CPU. The results equal the one-by-one updates up to
    float rounding, and are the same on every process.

    Returns:
        The mean decorrelation loss over the layers that saw rows (finite losses only), or ``None`` if none did.
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
            raise ValueError("decorrelation_step was given a pending exchange with update=False")
        return None
    reference = decorrelations[0].R
    if pending is None:
        pending = begin_decorrelation_step(decorrelations, process_group, transfer_dtype)
    elif pending.decorrelations != decorrelations:
        raise ValueError("decorrelation_step was given the pending exchange of other modules")
    elif any(d.num_rows for d in decorrelations):
        raise RuntimeError("statistics were gathered after begin_decorrelation_step; call it after the last forward")
    statistics = pending.wait()
    # Every update stays on the device; the losses and the guard's decisions of all layers are read in one go.
    updates = [(d, zz / count if zz is not None else None, rows)
               for d, (count, zz, rows) in zip(decorrelations, statistics, strict=True) if count > 0]  # fmt: skip
    if batch_updates is None:  # an accelerator pays a kernel launch per operation and R; a CPU does not
        batch_updates = reference.device.type != "cpu"
    results = []
    for group in _equal_shaped_groups(updates) if batch_updates else [[u] for u in updates]:
        if len(group) == 1:
            d, second_moment, rows = group[0]
            results.append((d, *d.update(second_moment, lr, kappa, max_loss, rows=rows, variance_form=variance_form)))
            continue
        matrices = [d.R for d, _, _ in group]
        stacked = torch.stack(matrices)  # a transient copy of this group only (bounded by _BATCH_BYTES), not of every R
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
        groups.setdefault(key, []).append(update)
    chunks = []
    for group in groups.values():
        size = max(1, _BATCH_BYTES // (group[0][0].R.numel() * group[0][0].R.element_size()))
        chunks += [group[i : i + size] for i in range(0, len(group), size)]
    return chunks


@torch.no_grad()
def fold_decorrelation(root: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``root`` with every ``R`` folded into its layers' weights (``W <- W R``) and removed.

    The result loads into the plain model the layers were injected into: parameter names are unchanged.
    """
    state = root.state_dict()
    for name, module in root.named_modules():
        if isinstance(module, DECORRELATED_LAYERS):
            prefix = f"{name}." if name else ""
            state[f"{prefix}weight"] = module.folded_weight().detach().clone()
    for name, module in root.named_modules():
        if isinstance(module, Decorrelation):
            del state[f"{name}.R" if name else "R"]
    return state
