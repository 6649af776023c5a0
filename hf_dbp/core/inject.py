"""Putting R into a model and taking it out: inject the decorrelated layers a plan names, measure the same statistics
on an unchanged model (the BP baseline), fold every R into its weights, and keep R out of optimizers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .decorrelation import Decorrelation, is_recomputing_forward
from .layers import DECORRELATED_LAYERS, decorrelated_class, input_rows, input_width, output_width
from .sampling import RowSampler, as_row_sampler


def decorrelation_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Every `R` of `model` (each once, in module order): what an optimizer must never hold."""
    return [m.R for m in model.modules() if isinstance(m, Decorrelation)]


def drop_decorrelation_matrices(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Remove every `R` of `model` from `optimizer`'s parameter groups; returns how many were there.

    For optimizers built by hand from `model.parameters()`, which hold `R` whatever its `requires_grad`. `R`
    never gets a gradient, so such an optimizer would not move it; out of the groups it is not even looked at.
    """
    matrices = {id(R) for R in decorrelation_matrices(model)}
    dropped = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in matrices]
        dropped += len(group["params"]) - len(kept)
        group["params"] = kept
    return dropped


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
"""Modules whose children are the layers of a forward (run in turn, or looped over): never the home of an R."""


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


def decorrelation_module_name(group: str) -> str:
    """The name part under which `inject_decorrelation` registers the `R` of `group` (beside its layers)."""
    return f"{_split(group)[1]}_decorrelation"


def inject_decorrelation(
    root: nn.Module,
    groups: Mapping[str, Sequence[str]],
    sample_fraction: float = 0.1,
    generator: RowSampler | torch.Generator | None = None,
    block_size: int | None = None,
) -> dict[str, Decorrelation]:
    """Decorrelate the inputs of the layers a plan names, in place.

    Args:
        root: the model (or sub-model) holding the layers.
        groups: for each `R`, its name (a dotted path; the `Decorrelation` is registered beside the layers as
            `<parent>.<leaf>_decorrelation`, or where that parent is an `nn.Sequential`, `nn.ModuleList` or
            `nn.ModuleDict`, inside the group's first layer, as `<first layer>.<leaf>_decorrelation`) and the
            paths of the layers that read the same input through it.
            Example: ``{"layers.0.attention.qkv": ["layers.0.attention.q_proj", "layers.0.attention.k_proj",
            "layers.0.attention.v_proj"]}``.
        sample_fraction, generator, block_size: see [`~hf_dbp.core.decorrelation.Decorrelation`].

    Returns:
        The new `Decorrelation` modules by group name. Each starts at the identity, so the model's outputs are
        unchanged.
    """
    generator = as_row_sampler(generator)  # once, so that every layer draws from the same sequence
    decorrelations = {}
    for name, paths in groups.items():
        layers = [root.get_submodule(p) for p in paths]
        widths = {input_width(layer) for layer in layers}
        if len(widths) != 1:
            raise ValueError(f"layers {list(paths)} of group {name!r} have different input widths {widths}")
        reference = layers[0].weight
        decorrelation = Decorrelation(widths.pop(), sample_fraction, generator, block_size).to(reference.device)
        decorrelation.consumers = len(layers)
        decorrelation.group_out_features = sum(output_width(layer) for layer in layers)
        for i, (path, layer) in enumerate(zip(paths, layers, strict=True)):
            wrapper = decorrelated_class(layer)
            if isinstance(layer, DECORRELATED_LAYERS):
                raise ValueError(f"layer {path!r} is already decorrelated")
            layer_parent, layer_leaf = _split(path)
            new = wrapper.from_layer(layer, decorrelation, record_statistics=i == 0)
            setattr(root.get_submodule(layer_parent), layer_leaf, new)
        owner = root.get_submodule(_split(name)[0])
        if isinstance(owner, _CONTAINERS):
            # nn.Sequential runs every child as a layer, and loops over a ModuleList or ModuleDict see every entry: an
            # R registered there would be run (or counted) as a layer. The group's first layer holds it instead.
            owner = root.get_submodule(paths[0])
        owner.register_module(decorrelation_module_name(name), decorrelation)
        decorrelations[name] = decorrelation
    return decorrelations


class DecorrelationMonitor:
    """Measures the decorrelation statistics of a plain model's layers without changing the model.

    Forward hooks on the first layer of each group record the statistics of the layer's input (`R` stays the
    identity, so `z = x`); `hf_dbp.decorrelation_step` of this monitor's modules (with `lr=0`) reports the same loss a DBP model
    would, without updating anything. Call `remove` to detach the hooks.
    """

    def __init__(
        self,
        root: nn.Module,
        groups: Mapping[str, Sequence[str]],
        sample_fraction: float = 0.1,
        generator: RowSampler | torch.Generator | None = None,
        block_size: int | None = None,
    ) -> None:
        self.decorrelations: dict[str, Decorrelation] = {}
        self._handles = []
        generator = as_row_sampler(generator)  # once, so that every layer draws from the same sequence
        for name, paths in groups.items():
            layer = root.get_submodule(paths[0])
            decorrelation = Decorrelation(input_width(layer), sample_fraction, generator, block_size).to(
                layer.weight.device
            )
            self.decorrelations[name] = decorrelation
            self._handles.append(layer.register_forward_pre_hook(self._hook(decorrelation)))

    @staticmethod
    def _hook(decorrelation: Decorrelation):
        def hook(layer: nn.Module, args: tuple) -> None:
            if layer.training and not is_recomputing_forward():
                decorrelation.observe(input_rows(layer, args[0]))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.no_grad()
def fold_decorrelation(root: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `root` with every `R` folded into its layers' weights (`W <- W R`) and removed.

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
