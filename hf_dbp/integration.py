"""DBP for any transformers model: decorrelate it, step it, save and load it, merge it back (PEFT's shape).

```python
import hf_dbp
model = AutoModelForCausalLM.from_config(config)
model = hf_dbp.decorrelate(model, hf_dbp.DecorrelationConfig(lr=1e-3))
...  # loss.backward(); optimizer.step(); hf_dbp.decorrelation_step(model)
model.save_pretrained("out")  # weights, every R, and the DecorrelationConfig in config.json
model = hf_dbp.load_decorrelated(AutoModelForCausalLM, "out")
plain = hf_dbp.merge_decorrelation(model)  # the original class, R folded in
```

The model stays an instance of its own class, with the parameter names it had: each target layer becomes its
decorrelated twin (`hf_dbp.decorrelation`), and each R is registered beside the layers that read it, as
`<parent>.<name>_decorrelation.R`. The model's config carries the `DecorrelationConfig` (with its resolved `groups`) as
`config.decorrelation`, so every `save_pretrained`, Trainer checkpoint and `push_to_hub` carries it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR, CONFIG_ATTRIBUTE, DecorrelationConfig
from .decorrelation import (
    DECORRELATED_LAYERS,
    PLAIN_LAYERS,
    Decorrelation,
    RowSampler,
    _input_width,
    decorrelation_module_name,
    inject_decorrelation,
    is_patchifying,
)
from .decorrelation import decorrelation_step as _update_decorrelations
from .mapping import EXCLUDE_MODULES, TARGET_MODULES

_DECORRELATABLE = (nn.Linear, Conv1D, nn.Conv2d)


def _matches(name: str, pattern: list[str] | str | None) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith(f".{p}") for p in pattern)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


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
    model_type = _model_type(model)
    if targets is None:
        if model_type not in TARGET_MODULES:
            raise ValueError(
                f"hf_dbp has no default target modules for model type {model_type!r} ({type(model).__name__}); pass "
                f"DecorrelationConfig(target_modules=[...]) (names, a regular expression or '{ALL_LINEAR}'). "
                f"Defaults exist for: {sorted(TARGET_MODULES)}"
            )
        targets = TARGET_MODULES[model_type]
        if excludes is None:
            excludes = EXCLUDE_MODULES.get(model_type)
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
            raise ValueError(f"target module {name!r} ({type(module).__name__}) cannot be decorrelated: hf_dbp "
                             "decorrelates nn.Linear, transformers' Conv1D and patchifying nn.Conv2d")  # fmt: skip
        if isinstance(module, nn.Conv2d) and not is_patchifying(module):
            raise ValueError(f"target module {name!r} is an nn.Conv2d that is not patchifying (kernel == stride, no "
                             "padding or dilation, groups=1): its input rows overlap, and R cannot be folded into it")  # fmt: skip
        names.append(name)
    if not names:
        raise ValueError(f"no layer of {type(model).__name__} matches target_modules={targets!r} "
                         f"(exclude_modules={excludes!r})")  # fmt: skip
    return names


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A tiny input for `model` (from its `main_input_name` and config), to trace which layers read the same input."""
    config = model.config
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype if parameter.is_floating_point() else torch.float32
    name = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(0)
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
    model: nn.Module, config: DecorrelationConfig, inputs: Mapping[str, torch.Tensor] | None = None
) -> dict[str, list[str]]:
    """The groups `hf_dbp.decorrelate` would inject: each R's name and the target layers that read it.

    Which targets share one R is found from the model, not from a list: one forward of `inputs` (default:
    `example_inputs(model)`) in eval mode records the input tensor of every target, and targets that read the very
    same tensor (q, k and v; gate and up of a gated MLP) share one R. A target the forward does not reach gets an R
    of its own.
    """
    names = target_layer_names(model, config)
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
        with torch.no_grad():
            model(**(dict(inputs) if inputs is not None else example_inputs(model)))
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
    widths_differ = [m for m in members.values() if len({_input_width(model.get_submodule(p)) for p in m}) > 1]
    if widths_differ:
        raise ValueError(f"layers {widths_differ[0]} read the same input but have different input widths")
    return {_group_name(paths): paths for paths in members.values()}


def _inject(model: nn.Module, config: DecorrelationConfig) -> None:
    # In the order of the layers in the model, whatever order the groups were saved in (config.json sorts its keys):
    # every R is then registered, iterated and checkpointed in the same order on every path.
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [p for paths in config.groups.values() for p in paths if p not in position]
    if missing:
        raise ValueError(f"the decorrelation plan names layers that {type(model).__name__} does not have: {missing[:3]}")
    groups = dict(sorted(config.groups.items(), key=lambda item: position[item[1][0]]))
    inject_decorrelation(model, groups, sample_fraction=config.sample_fraction, generator=RowSampler(config.seed))
    if isinstance(model, PreTrainedModel):
        # R and its statistics stay in float32 when the model is loaded in half precision (matched as whole name
        # parts, so these name exactly the R of this plan).
        keep = set(model._keep_in_fp32_modules_strict or [])
        model._keep_in_fp32_modules_strict = keep | {decorrelation_module_name(g) for g in config.groups}
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_ATTRIBUTE, config.to_dict())


def decorrelate(
    model: nn.Module,
    config: DecorrelationConfig | None = None,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Decorrelate the inputs of `model`'s target layers, in place, and return it.

    Every R starts at the identity, so the model's outputs are unchanged; `config.groups` is filled in with the plan
    (see `plan_decorrelation`) and stored as `model.config.decorrelation`. Unlike PEFT, nothing is frozen: DBP trains
    the whole model, and R is updated by `decorrelation_step`, never by an optimizer (R has no gradient).

    Args:
        model: a transformers model (or any `nn.Module` with `config.groups` or `target_modules` given).
        config: which layers and the step's settings; defaults to `DecorrelationConfig()`.
        example_inputs: an input for the tracing forward, where `example_inputs(model)` cannot build one.
    """
    config = copy.deepcopy(config) if config is not None else DecorrelationConfig()
    if any(isinstance(m, Decorrelation) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already decorrelated")
    if config.groups is None:
        config.groups = plan_decorrelation(model, config, example_inputs)
    _inject(model, config)
    return model


def decorrelation_config_of(model: nn.Module) -> DecorrelationConfig | None:
    """The `DecorrelationConfig` of a decorrelated model (or of the first model inside it that has one), else None.

    A `ViTMAEDBP` model's config holds the same settings under its own field names (`decorrelation_lr`, ...).
    """
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        values = getattr(config, CONFIG_ATTRIBUTE, None)
        if isinstance(values, Mapping):
            return DecorrelationConfig.from_dict(dict(values))
        if hasattr(config, "decorrelation_lr") and hasattr(config, "decorrelation_kappa"):
            return DecorrelationConfig(
                lr=config.decorrelation_lr, kappa=config.decorrelation_kappa,
                sample_fraction=config.decorrelation_sample_fraction, variance_form=config.decorrelation_variance_form,
            )  # fmt: skip
    return None


def decorrelation_modules(model: nn.Module) -> list[Decorrelation]:
    """Every `Decorrelation` (one R each) of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, Decorrelation)]


@torch.no_grad()
def decorrelation_step(
    model: nn.Module | Iterable[Decorrelation],
    lr: float | None = None,
    kappa: float | None = None,
    *,
    lr_scale: float = 1.0,
    **kwargs,
) -> float | None:
    """Update every R of `model` from the statistics of its training forwards since the last call; call it after
    each optimizer step.

    Given a model, `lr`, `kappa` and the variance form come from its `DecorrelationConfig` unless passed; `lr_scale`
    multiplies the lr (e.g. the weights' schedule factor). Given the `Decorrelation` modules themselves, `lr` and
    `kappa` are required. Other keyword arguments (`max_loss`, `on_divergence`, `process_group`) are those of
    `hf_dbp.decorrelation.decorrelation_step`. Returns the mean decorrelation loss, or None if no forward ran.
    """
    if isinstance(model, nn.Module):
        modules = decorrelation_modules(model)
        config = decorrelation_config_of(model)
        if config is None and (lr is None or kappa is None):
            raise ValueError(f"{type(model).__name__} is not decorrelated (no DecorrelationConfig): call "
                             "hf_dbp.decorrelate(model, config) first")  # fmt: skip
        lr = config.lr if lr is None else lr
        kappa = config.kappa if kappa is None else kappa
        if config is not None:
            kwargs.setdefault("variance_form", config.variance_form)
    else:
        modules = list(model)
        if lr is None or kappa is None:
            raise ValueError("decorrelation_step of Decorrelation modules needs lr and kappa")
    return _update_decorrelations(modules, lr * lr_scale, kappa, **kwargs)


@contextlib.contextmanager
def _decorrelate_on_construction(model_class: type, config: DecorrelationConfig):
    """While active, every `model_class` built (as `from_pretrained` builds it) is decorrelated at the end of its
    `__init__`, before the loader fills in its weights: the loader then loads every R like any other parameter, with
    transformers' key conversions, dtype and device handling."""
    original = model_class.__dict__.get("post_init")

    def post_init(self, *args, **kwargs):
        (original or super(model_class, self).post_init)(*args, **kwargs)
        if type(self) is model_class:
            _inject(self, config)

    model_class.post_init = post_init
    try:
        yield
    finally:
        if original is None:
            del model_class.post_init
        else:
            model_class.post_init = original


def _resolve_class(model_class, config) -> type:
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, mapping)


def load_decorrelated(model_class, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load a model saved by a decorrelated model's `save_pretrained`: the same model back, every R exact.

    Args:
        model_class: an Auto class (`AutoModelForCausalLM`, ...) or a model class.
        pretrained_model_name_or_path: a folder or Hub repo whose config.json has a `decorrelation` entry.
        **kwargs: passed to `from_pretrained` (`dtype`, `device_map`, `revision`, `token`, ...). R stays float32.
    """
    from transformers import AutoConfig

    config = kwargs.pop("config", None)
    if config is None:
        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "trust_remote_code", "subfolder")
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **{k: kwargs[k] for k in hub_keys if k in kwargs})
    values = getattr(config, CONFIG_ATTRIBUTE, None)
    if not isinstance(values, Mapping) or not values.get("groups"):
        raise ValueError(
            f"{pretrained_model_name_or_path} is not a decorrelated checkpoint (its config has no '{CONFIG_ATTRIBUTE}' "
            "entry with groups); load it with from_pretrained and call hf_dbp.decorrelate"
        )
    decorrelation = DecorrelationConfig.from_dict(dict(values))
    model_class = _resolve_class(model_class, config)
    with _decorrelate_on_construction(model_class, decorrelation):
        model, info = model_class.from_pretrained(
            pretrained_model_name_or_path, config=config, output_loading_info=True, **kwargs
        )
    missing = [key for key in info["missing_keys"] if key.endswith("_decorrelation.R")]
    if missing:
        raise ValueError(f"{pretrained_model_name_or_path} lacks the decorrelation matrices {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}: the checkpoint does not match its config")  # fmt: skip
    return model


@torch.no_grad()
def merge_decorrelation(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` as its original class with every R folded into its layers' weights (`W <- W R`) and no R left.

    The result gives the same outputs, has no overhead, and saves and loads with transformers alone. By default
    `model` is left unchanged (the merge works on a copy); `inplace=True` saves the copy's memory (like PEFT's
    `merge_and_unload`). A `ViTMAEDBP` model returns its plain transformers ViTMAE class.
    """
    own = getattr(model, "merge_decorrelation", None)
    if callable(own):  # ViTMAEDBP: a class of its own, whose plain twin is a transformers class
        return own()
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, DECORRELATED_LAYERS):
            plain_class = PLAIN_LAYERS[type(module)]
            plain = plain_class.__new__(plain_class)
            ours = ("record_statistics", "_folded_cache", "decorrelation")
            plain.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items() if k not in ours})
            plain.weight = nn.Parameter(module.folded_weight().detach().clone(), module.weight.requires_grad)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, plain)
    for name, module in list(model.named_modules()):
        if isinstance(module, Decorrelation):
            parent, _, leaf = name.rpartition(".")
            delattr(model.get_submodule(parent), leaf)
    if isinstance(model, PreTrainedModel):
        model._keep_in_fp32_modules_strict = {n for n in model._keep_in_fp32_modules_strict or [] if not n.endswith("_decorrelation")}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_ATTRIBUTE):
        delattr(config, CONFIG_ATTRIBUTE)
    return model


__all__ = [
    "decorrelate",
    "decorrelation_config_of",
    "decorrelation_modules",
    "decorrelation_step",
    "example_inputs",
    "load_decorrelated",
    "merge_decorrelation",
    "plan_decorrelation",
    "target_layer_names",
]
