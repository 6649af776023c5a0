"""Which layers of a model DBP decorrelates, and which of them share one R (found by tracing one forward).

`plan_decorrelation(model, config)` returns the plan `{group name: [layer paths]}` that `hf_dbp.decorrelate` injects
and that the model's config stores. Targets come from `DecorrelationConfig.target_modules` or, where it is not given,
the per-architecture defaults of `hf_dbp.target_modules`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..target_modules import EXCLUDE_MODULES, TARGET_MODULES
from .config import ALL_LINEAR, DecorrelationConfig
from .layers import DECORRELATED_LAYERS, input_width, is_patchifying

logger = logging.getLogger(__name__)

ExampleInputs = Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor
"""An input for one forward of a model: keyword arguments (a dict), positional ones (a tuple), or one tensor."""

_DECORRELATABLE = (nn.Linear, Conv1D, nn.Conv2d)


def _matches(name: str, pattern: list[str] | str | None) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith(f".{p}") for p in pattern)


def architecture_of(model: nn.Module) -> str:
    """The key of `model`'s defaults in `hf_dbp.target_modules`: a transformers model's `config.model_type`, else
    the module's class qualified by its library (`timm.VisionTransformer`, `__main__.MLP`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str):
        return model_type
    cls = type(model)
    return f"{cls.__module__.partition('.')[0]}.{cls.__name__}"


def _output_layer_names(model: nn.Module) -> set[str]:
    """The dotted names of the model's output embeddings (LM head), which `"all-linear"` leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _decoder_prefixes(model: nn.Module) -> list[str]:
    """The names of the decoder of an encoder-decoder model, which `"all-linear"` leaves alone."""
    config = getattr(model, "config", None)
    get = getattr(model, "get_decoder", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(get):
        return []
    with contextlib.suppress(Exception):
        decoder = get()
        return [name for name, module in model.named_modules() if module is decoder and name]
    return []


def target_layer_names(model: nn.Module, config: DecorrelationConfig) -> list[str]:
    """The dotted names of the layers `config` selects in `model`, in module order (see `DecorrelationConfig`)."""
    targets, excludes = config.target_modules, config.exclude_modules
    architecture = architecture_of(model)
    if targets is None:
        if architecture not in TARGET_MODULES:
            kind = "model type " if architecture == getattr(getattr(model, "config", None), "model_type", None) else ""
            raise ValueError(
                f"hf_dbp has no default target modules for {kind}{architecture!r} ({type(model).__name__}); pass "
                f"DecorrelationConfig(target_modules=[...]) (names, a regular expression or '{ALL_LINEAR}'). "
                f"Defaults exist for: {sorted(TARGET_MODULES)}"
            )
        targets = TARGET_MODULES[architecture]
        if excludes is None:
            excludes = EXCLUDE_MODULES.get(architecture)
    skipped = set()
    if targets == ALL_LINEAR:
        skipped = _output_layer_names(model)
        prefixes = _decoder_prefixes(model)
        skipped |= {n for n, _ in model.named_modules() if any(n == p or n.startswith(f"{p}.") for p in prefixes)}
    names = []
    for name, module in model.named_modules():
        if isinstance(module, DECORRELATED_LAYERS):
            raise ValueError(f"{type(model).__name__} is already decorrelated (layer {name!r}); call decorrelate once")
        if not name or name in skipped or _matches(name, excludes):
            continue
        selected = isinstance(module, (nn.Linear, Conv1D)) if targets == ALL_LINEAR else _matches(name, targets)
        if not selected:
            continue
        if not isinstance(module, _DECORRELATABLE):
            if targets == ALL_LINEAR:
                continue
            raise ValueError(
                f"target module {name!r} ({type(module).__name__}) cannot be decorrelated: hf_dbp decorrelates "
                "nn.Linear, transformers' Conv1D and patchifying nn.Conv2d"
            )
        if isinstance(module, nn.Conv2d) and not is_patchifying(module):
            raise ValueError(
                f"target module {name!r} is an nn.Conv2d that is not patchifying (kernel == stride, no padding or "
                "dilation, groups=1): its input rows overlap, and R cannot be folded into it"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"no layer of {type(model).__name__} matches target_modules={targets!r} (exclude_modules={excludes!r})"
        )
    return names


def example_inputs(model: nn.Module) -> ExampleInputs | None:
    """A tiny input for one forward of `model`, to trace which layers read the same input; None where nothing says
    what the model takes (a plain module: pass `example_inputs` to `decorrelate`).

    A transformers model gets one from its `main_input_name` and config; a timm model one image of its
    `pretrained_cfg["input_size"]`.
    """
    parameter = next(model.parameters(), None)
    if parameter is None:
        return None
    device, dtype = parameter.device, parameter.dtype if parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "main_input_name"):
        timm_config = getattr(model, "pretrained_cfg", None)
        if isinstance(timm_config, Mapping) and timm_config.get("input_size"):
            image = torch.randn(1, *timm_config["input_size"], generator=generator)
            return (image.to(device=device, dtype=dtype),)
        return None
    name = model.main_input_name
    inputs: dict[str, torch.Tensor] = {}
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 2
        inputs[name] = torch.randint(0, vocab, (1, 8), generator=generator)
    elif name == "pixel_values":
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        inputs[name] = torch.randn(1, channels, height, width, generator=generator)
    elif name == "input_values":
        inputs[name] = torch.randn(1, 16000, generator=generator)
    elif name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs[name] = torch.randn(1, getattr(config, "num_mel_bins", 80), frames, generator=generator)
    else:
        raise ValueError(f"cannot build an example input {name!r} for {type(model).__name__}: pass example_inputs")
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((1, 2), start, dtype=torch.long)
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def _random_state_kept(model: nn.Module):
    """`torch.random.fork_rng` over the CPU generator and that of the accelerator the model is on, if any."""
    accelerators = {p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")}
    if not accelerators:
        return torch.random.fork_rng(devices=[])
    device_type = next(iter(accelerators)).type
    return torch.random.fork_rng(devices=sorted(d.index or 0 for d in accelerators), device_type=device_type)


def _run(model: nn.Module, inputs: ExampleInputs) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, torch.Tensor):
        model(inputs)
    else:
        model(*inputs)


def _group_name(paths: list[str]) -> str:
    """The name of the R that `paths` share: beside the first layer, named after all of them.

    One layer keeps its own name (`mlp.fc1` -> `mlp.fc1_decorrelation`); several are named by their common parent
    and the distinct parts of their names: `q_proj`, `k_proj`, `v_proj` -> `qkv`, `gate_proj`, `up_proj` -> `gate_up`,
    `query`, `key`, `value` -> `query_key_value`.
    """
    parent = paths[0].rpartition(".")[0]
    if len(paths) == 1:
        return paths[0]
    leaves = [p.rpartition(".")[2] for p in paths]
    suffix = os.path.commonprefix([leaf[::-1] for leaf in leaves])[::-1]
    suffix = suffix[suffix.find("_") :] if "_" in suffix else ""
    stems = [leaf[: len(leaf) - len(suffix)] if suffix else leaf for leaf in leaves]
    joined = "".join(stems) if all(len(s) == 1 for s in stems) else "_".join(stems)
    return f"{parent}.{joined}" if parent else joined


def plan_decorrelation(
    model: nn.Module, config: DecorrelationConfig, inputs: ExampleInputs | None = None
) -> dict[str, list[str]]:
    """The groups `hf_dbp.decorrelate` would inject: each R's name and the target layers that read it.

    Which targets share one R is found from the model, not from a list: one forward of `inputs` (a dict of keyword
    arguments, a tuple of positional ones, or one tensor; default: `example_inputs(model)`) in eval mode records the
    input tensor of every target, and targets that read the very same tensor (q, k and v; gate and up of a gated MLP)
    share one R. A target the forward does not reach gets an R of its own, and so does every target of a plain module
    for which no input is given or can be built (logged: R is then not shared where it could be).
    """
    names = target_layer_names(model, config)
    inputs = example_inputs(model) if inputs is None else inputs
    if inputs is None:
        logger.info(
            "No example input for %s: each of its %d target layers gets an R of its own (pass example_inputs to "
            "decorrelate to let layers that read the same input share one)",
            type(model).__name__,
            len(names),
        )
        return {_group_name([name]): [name] for name in names}
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module, args, name=name):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0]  # the tensor itself, kept alive so that its identity stays unique

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        # The tracing forward may draw random numbers (ViTMAE's masking does): it must not move the caller's
        # generators, or planning a BP baseline's measurement would change the masks its training draws.
        with torch.no_grad(), _random_state_kept(model):
            _run(model, inputs)
    except Exception as error:
        raise ValueError(
            f"could not run {type(model).__name__} on an example input to find which layers share an input "
            f"({type(error).__name__}: {error}); pass example_inputs=... to decorrelate, or DecorrelationConfig(groups=...)"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    members: dict[int, list[str]] = {}
    for name in names:
        key = id(seen[name]) if name in seen else id(name)
        members.setdefault(key, []).append(name)
    widths_differ = [m for m in members.values() if len({input_width(model.get_submodule(p)) for p in m}) > 1]
    if widths_differ:
        raise ValueError(f"layers {widths_differ[0]} read the same input but have different input widths")
    return {_group_name(paths): paths for paths in members.values()}


__all__ = ["architecture_of", "example_inputs", "plan_decorrelation", "target_layer_names"]
