"""The decorrelated layers: `nn.Linear`, transformers' `Conv1D` and a patchifying `nn.Conv2d` that read their
input through an `R` (`y = W (R x) + b`), and their folded form `W R`.

Each keeps the parameter names of the layer it replaces (`weight`, `bias`), so checkpoints of the plain model load
unchanged, and reads its `R` from a [`~hf_dbp.core.decorrelation.Decorrelation`] that several layers may share (q, k
and v read the same input, so one `R` serves all three). Each computes the cheaper of two equal forms: `W (R x)`
(`z = R x` once for all layers of a group) or `(W R) x` (a fold cached while W and R are unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .decorrelation import Decorrelation, is_recomputing_forward, multiply_transposed


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows that `R` acts on for the input `x` of `layer`: one row per token (Linear) or per patch (Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        # A patchifying conv (kernel == stride, no padding) applies W to each flattened C x p x p patch, flattened in
        # the same (channel, row, column) order as the conv's weight.
        patches = F.unfold(x, kernel_size=layer.kernel_size, stride=layer.stride)  # (B, C*p*p, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _rebase(layer: nn.Module, cls: type, decorrelation: Decorrelation, record_statistics: bool) -> nn.Module:
    """A `cls` with the hyper-parameters, parameters and hooks of `layer` (shared, not copied)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in layer.__dict__.items()})
    new.record_statistics = record_statistics
    new._folded_cache = None
    new._pending_folded_grad = None  # the sum of the fold's gradients while W's waits (`_FoldedForward`)
    object.__setattr__(new, "decorrelation", decorrelation)  # a reference, not a registered sub-module
    return new


def _fold_in_weight_precision(layer: nn.Module) -> torch.Tensor:
    """`layer.fold()` outside autocast, so that W R keeps W's precision; a forward under autocast casts it as it
    would W."""
    with torch.autocast(device_type=layer.weight.device.type, enabled=False):
        return layer.fold()


def _cached_fold(layer: nn.Module) -> torch.Tensor:
    """`W R` without a graph, computed once and reused while neither W nor R changes.

    One fold serves every forward between two optimizer steps: all the micro-batches of a gradient-accumulation step
    and every evaluation batch. The cache is keyed on the version counters of W and R (the optimizer's and DBP's
    in-place updates bump them), on their storage, and on the count of DBP steps, which changes after every optimizer
    step even where a sharded optimizer (FSDP) writes W's storage behind its version counter.

    Under engines that shard W and gather it whole around each forward (FSDP1 and FSDP2 with resharding, DeepSpeed
    ZeRO-3), the W a forward sees is a fresh copy whose version counter does not move and whose storage may be
    reused, so the key cannot tell two gathers apart. That is safe because W's values change only where the key
    changes: in an optimizer step (the DBP step after it counts it) or in a load of weights, which drops the cache
    (`_load_from_state_dict` below for loads through the modules; `clear_folded_weights` for loads that write the
    shards directly, which `DecorrelationCallback` calls at the start and end of training, around Trainer's loads).
    Within one step every gather gives the same W, so one fold serves them all (tests/test_engines.py compares
    FSDP2's gradients and outputs with an unsharded model's, step by step).
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


def clear_folded_weights(model: nn.Module) -> None:
    """Drop the cached folds `W R` of every decorrelated layer of `model`: call it after writing weights behind the
    modules' back (a sharding engine's checkpoint load that writes the shards directly), so that the next forward
    folds the new W."""
    for module in model.modules():
        if isinstance(module, DECORRELATED_LAYERS):
            module._folded_cache = None


class _FoldCacheDroppedOnLoad:
    """Drops a decorrelated layer's cached fold when weights are loaded into it (`load_state_dict`, also where a
    sharding engine's load writes the shards: FSDP's `set_model_state_dict` goes through the modules too)."""

    def _load_from_state_dict(self, *args, **kwargs):
        self._folded_cache = None
        return super()._load_from_state_dict(*args, **kwargs)


class _FoldedForward(torch.autograd.Function):
    """A linear layer or patchifying conv run with a precomputed folded weight `F = W R`, differentiable in W.

    Why by hand: autograd would need `W @ R` inside every micro-batch's graph to reach W, costing `d_out * d^2`
    per micro-batch in the forward. Here `F` comes from the cache (once per optimizer step) and the backward turns
    the gradient of `F` into that of W: `dW = dF R^T`, exactly what autograd computes for `W @ R`.

    That map costs `d_out * d^2` too, as much as the fold. Where the layer's `Decorrelation.is_last_micro_batch`
    says a micro-batch is not the last of its step, its `dF` is added to the layer's sum and W gets no gradient yet;
    the last micro-batch maps the whole sum at once: `(dF_1 + ... + dF_k) R^T`, the same sum as `dF_1 R^T + ... +
    dF_k R^T` up to float rounding, for one product per optimizer step instead of k.
    """

    @staticmethod
    def forward(x, weight, bias, R, folded, stride, layer):
        if stride is None:
            return F.linear(x, folded, bias)
        return F.conv2d(x, folded, bias, stride)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, R, folded, stride, layer = inputs
        ctx.layer = layer
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
            # F = W R with W flattened to (d_out, d) for the conv: dW = dF R^T, in R's precision (block by block for a
            # block-diagonal R).
            flat = grad_folded.reshape(grad_folded.shape[0], -1).to(R.dtype)
            layer = ctx.layer
            pending = getattr(layer, "_pending_folded_grad", None)  # absent from a layer pickled by an earlier hf_dbp
            if pending is not None:
                flat = pending.add_(flat)
            is_last = layer.decorrelation.is_last_micro_batch
            if is_last is not None and not is_last():
                layer._pending_folded_grad = flat  # W's gradient comes with the step's last micro-batch
            else:
                layer._pending_folded_grad = None
                grad_weight = multiply_transposed(flat, R).reshape(grad_folded.shape)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _folded_forward(layer: nn.Module, x: torch.Tensor, stride: tuple[int, int] | None) -> torch.Tensor:
    """The layer's output from `W R`.

    Without gradients (evaluation), the cached fold. With them, the cached fold through `_FoldedForward` when
    the layer's `Decorrelation.reuse_fold_in_training` is set (gradient accumulation: one fold serves every
    micro-batch), otherwise a fold inside the graph (one forward per step: nothing to reuse, and the graph frees each
    fold as the backward passes it, where a cached one would stay in memory to the end of the step).
    """
    needs_grad = torch.is_grad_enabled() and (layer.weight.requires_grad or x.requires_grad)
    # A compiled graph cannot key a cache on version counters: it folds inside the graph, and autograd differentiates
    # `W @ R` itself, as it does for one forward per optimizer step.
    if torch.compiler.is_compiling() or (needs_grad and not layer.decorrelation.reuse_fold_in_training):
        folded = _fold_in_weight_precision(layer)
    else:
        folded = _cached_fold(layer)
        if needs_grad:
            return _FoldedForward.apply(
                x, layer.weight, layer.bias, layer.decorrelation.R.detach(), folded, stride, layer
            )
    if stride is None:
        return F.linear(x, folded, layer.bias)
    return layer._conv_forward(x, folded, layer.bias)


class DecorrelatedLinear(_FoldCacheDroppedOnLoad, nn.Linear):
    """`nn.Linear` computing `W (R x) + b` with `R` taken from a (possibly shared) [`Decorrelation`].

    Parameter names are those of `nn.Linear` (`weight`, `bias`). `record_statistics` is set on one layer of
    each group that shares an `R`, so that rows read by q, k and v are counted once. The `Decorrelation` is held
    as a plain attribute, not a sub-module: its owner registers it once (see `hf_dbp.core.inject.inject_decorrelation`).
    """

    @classmethod
    def from_layer(
        cls, linear: nn.Linear, decorrelation: Decorrelation, record_statistics: bool
    ) -> DecorrelatedLinear:
        """Wrap `linear` without copying: the new layer shares its weight and bias parameters."""
        return _rebase(linear, cls, decorrelation, record_statistics)

    def fold(self) -> torch.Tensor:
        """`W R`, computed now (differentiable in W only)."""
        return self.decorrelation.fold_into(self.weight)

    def folded_weight(self) -> torch.Tensor:
        """`W R`: the weight of a plain linear layer with the same outputs (cached while W and R are unchanged)."""
        return _cached_fold(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record_statistics and not is_recomputing_forward():
            self.decorrelation.observe(input_rows(self, x))
        # Two equal forms; pick the cheaper one. Explicit z = R x costs n_rows * d^2 once for the whole group (q, k
        # and v share it); folding costs d_out * d^2 for each layer of the group (both again in backward). So fold
        # when the rows outnumber the group's outputs.
        if x.numel() // self.in_features > self.decorrelation.group_out_features:
            return _folded_forward(self, x, stride=None)
        return F.linear(self.decorrelation.shared_forward(x), self.weight, self.bias)


def is_patchifying(conv: nn.Conv2d) -> bool:
    """Whether `conv` cuts its input into disjoint patches (kernel == stride, no padding or dilation, groups=1): only
    then is each output a product of W with one flattened patch, so that R acts on the patches and folds into W."""
    return (
        conv.kernel_size == conv.stride
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


class DecorrelatedConv2d(_FoldCacheDroppedOnLoad, nn.Conv2d):
    """A patchifying `nn.Conv2d` (kernel == stride, no padding) with `R` acting on each flattened patch.

    The conv has as many outputs per image as patches but only `out_channels` rows of weights, so the folded form
    `(W R)` is always the cheap one here.
    """

    @classmethod
    def from_layer(cls, conv: nn.Conv2d, decorrelation: Decorrelation, record_statistics: bool) -> DecorrelatedConv2d:
        if not is_patchifying(conv):
            raise ValueError(
                "DecorrelatedConv2d needs a patchifying conv: kernel_size == stride, no padding or dilation, groups=1"
            )
        return _rebase(conv, cls, decorrelation, record_statistics)

    def fold(self) -> torch.Tensor:
        """`W R` on the flattened patches, reshaped as a conv weight, computed now (differentiable in W)."""
        return self.decorrelation.fold_into(self.weight.reshape(self.out_channels, -1)).reshape(self.weight.shape)

    def folded_weight(self) -> torch.Tensor:
        """The weight of a plain conv with the same outputs (cached while W and R are unchanged)."""
        return _cached_fold(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record_statistics and not is_recomputing_forward():
            self.decorrelation.observe(input_rows(self, x))
        return _folded_forward(self, x, stride=self.stride)


class DecorrelatedConv1D(_FoldCacheDroppedOnLoad, Conv1D):
    """transformers' `Conv1D` (GPT-2's linear layer, weight stored transposed as `(in, out)`) computing
    `(R x) W + b`.

    Its folded weight is `R^T W`, kept in the `(in, out)` layout so that it loads into a plain `Conv1D`. A fused
    projection (GPT-2's `c_attn`: q, k and v in one matrix) is one layer reading one input: one R.
    """

    @classmethod
    def from_layer(cls, conv: Conv1D, decorrelation: Decorrelation, record_statistics: bool) -> DecorrelatedConv1D:
        return _rebase(conv, cls, decorrelation, record_statistics)

    def fold(self) -> torch.Tensor:
        """`R^T W` (the `(in, out)` weight of a plain `Conv1D` with the same outputs), differentiable in W."""
        R = self.decorrelation.R.detach().to(self.weight.dtype)
        if R.dim() == 2:
            return R.t() @ self.weight
        return self.decorrelation.fold_into(self.weight.t()).t().contiguous()

    def folded_weight(self) -> torch.Tensor:
        return _cached_fold(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record_statistics and not is_recomputing_forward():
            self.decorrelation.observe(input_rows(self, x))
        size_out = x.shape[:-1] + (self.nf,)
        if x.numel() // self.nx > self.decorrelation.group_out_features:
            needs_grad = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
            # Folded inside the graph when training (autograd differentiates R^T W), cached otherwise.
            weight = (
                _fold_in_weight_precision(self) if needs_grad or torch.compiler.is_compiling() else _cached_fold(self)
            )
        else:
            x, weight = self.decorrelation.shared_forward(x), self.weight
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), weight.to(x.dtype)).reshape(size_out)


DECORRELATED_LAYERS = (DecorrelatedLinear, DecorrelatedConv2d, DecorrelatedConv1D)
"""The decorrelated layer classes; each keeps the parameter names of the layer it replaced."""

PLAIN_LAYERS = {DecorrelatedLinear: nn.Linear, DecorrelatedConv2d: nn.Conv2d, DecorrelatedConv1D: Conv1D}
"""The plain class each decorrelated layer class replaced."""


def input_width(layer: nn.Module) -> int:
    if isinstance(layer, Conv1D):
        return layer.nx
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features
    raise TypeError(
        f"cannot decorrelate a {type(layer).__name__}: only nn.Linear, transformers' Conv1D and patchifying nn.Conv2d"
    )


def output_width(layer: nn.Module) -> int:
    if isinstance(layer, Conv1D):
        return layer.nf
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def decorrelated_class(layer: nn.Module) -> type:
    if isinstance(layer, Conv1D):
        return DecorrelatedConv1D
    return DecorrelatedConv2d if isinstance(layer, nn.Conv2d) else DecorrelatedLinear
