"""DBP for any PyTorch model: decorrelate it, step it, save and load it, merge it back (PEFT's shape).

```python
import hf_dbp

model = hf_dbp.decorrelate(model, hf_dbp.DecorrelationConfig(lr=1e-3))  # a transformers model, timm's, any module
...  # loss.backward(); optimizer.step(); hf_dbp.decorrelation_step(model)
plain = hf_dbp.merge_decorrelation(model)  # the original model, R folded in
```

The model stays an instance of its own class, with the parameter names it had: each target layer becomes its
decorrelated twin ([`hf_dbp.core.layers`]), and each R is registered beside the layers that read it, as
`<parent>.<name>_decorrelation.R` (inside the first of them, `<layer>.<name>_decorrelation.R`, where the parent is an
`nn.Sequential`, `nn.ModuleList` or `nn.ModuleDict`, whose children a forward runs or loops over). The
[`DecorrelationConfig`] (with its resolved `groups`) is kept where the model keeps its settings: a transformers
model's config (`config.decorrelation`, so that every `save_pretrained`, Trainer checkpoint and `push_to_hub` carries
it), or the module itself (`model.decorrelation_config`) for any other module.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from .config import CONFIG_ATTRIBUTE, DecorrelationConfig
from .decorrelation import Decorrelation
from .inject import decorrelation_module_name, inject_decorrelation
from .layers import DECORRELATED_LAYERS, PLAIN_LAYERS
from .plan import ExampleInputs, plan_decorrelation
from .sampling import RowSampler
from .step import PendingStatistics, update_decorrelations
from .step import begin_decorrelation_step as _begin_exchange

MODULE_ATTRIBUTE = "decorrelation_config"
"""The attribute of a module without a transformers config that holds its [`DecorrelationConfig`]."""


def _has_transformers_config(model: nn.Module) -> bool:
    return isinstance(getattr(model, "config", None), PreTrainedConfig)


def _inject(model: nn.Module, config: DecorrelationConfig) -> None:
    # In the order of the layers in the model, whatever order the groups were saved in (config.json sorts its keys):
    # every R is then registered, iterated and checkpointed in the same order on every path.
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [p for paths in config.groups.values() for p in paths if p not in position]
    if missing:
        raise ValueError(
            f"the decorrelation plan names layers that {type(model).__name__} does not have: {missing[:3]}"
        )
    groups = dict(sorted(config.groups.items(), key=lambda item: position[item[1][0]]))
    inject_decorrelation(
        model,
        groups,
        sample_fraction=config.sample_fraction,
        generator=RowSampler(config.seed),
        block_size=config.block_size,
    )
    if isinstance(model, PreTrainedModel):
        # R and its statistics stay in float32 when the model is loaded in half precision (matched as whole name
        # parts, so these name exactly the R of this plan).
        keep = set(model._keep_in_fp32_modules_strict or [])
        model._keep_in_fp32_modules_strict = keep | {decorrelation_module_name(g) for g in config.groups}
    set_decorrelation_config(model, config)


def set_decorrelation_config(model: nn.Module, config: DecorrelationConfig | None) -> None:
    """Keep `config` where `model` keeps its settings (see the module's docstring); None removes it. A config class
    that declares the field itself (ViTMAE-DBP's) keeps it, with an empty plan: it would otherwise take its default."""
    if _has_transformers_config(model):
        if config is None:
            if CONFIG_ATTRIBUTE in getattr(type(model.config), "__dataclass_fields__", {}):
                empty = DecorrelationConfig.from_dict(getattr(model.config, CONFIG_ATTRIBUTE) or {})
                setattr(model.config, CONFIG_ATTRIBUTE, empty.replace(target_modules=[], groups={}).to_dict())
            elif hasattr(model.config, CONFIG_ATTRIBUTE):
                delattr(model.config, CONFIG_ATTRIBUTE)
        else:
            setattr(model.config, CONFIG_ATTRIBUTE, config.to_dict())
    elif config is None:
        model.__dict__.pop(MODULE_ATTRIBUTE, None)
    else:
        setattr(model, MODULE_ATTRIBUTE, config)


def decorrelate(
    model: nn.Module, config: DecorrelationConfig | None = None, example_inputs: ExampleInputs | None = None
) -> nn.Module:
    """Decorrelate the inputs of `model`'s target layers, in place, and return it.

    Every R starts at the identity, so the model's outputs are unchanged; `config.groups` is filled in with the plan
    (see `plan_decorrelation`) and kept with the model. Unlike PEFT, nothing is frozen: DBP trains the whole model,
    and R is updated by the decorrelation step, never by an optimizer (R has no gradient).

    Args:
        model (`nn.Module`):
            A transformers model, a timm model, or any module (with `config.target_modules` or `config.groups` where
            hf_dbp has no defaults for it).
        config ([`DecorrelationConfig`], *optional*):
            Which layers, and the step's settings; defaults to `DecorrelationConfig()`.
        example_inputs (`dict`, `tuple` or `torch.Tensor`, *optional*):
            An input for one forward (keyword arguments, positional ones, or one tensor), to find which layers read
            the same input and share one R. Built for transformers and timm models; without one, every target of a
            plain module gets an R of its own.

    Raises:
        ValueError: the model is already decorrelated, no layer matches the targets, or a target is not an
            `nn.Linear`, transformers `Conv1D` or patchifying `nn.Conv2d`.
    """
    config = copy.deepcopy(config) if config is not None else DecorrelationConfig()
    if any(isinstance(m, Decorrelation) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already decorrelated")
    if config.groups is None:
        config.groups = plan_decorrelation(model, config, example_inputs)
    _inject(model, config)
    return model


def decorrelation_config_of(model: nn.Module) -> DecorrelationConfig | None:
    """The [`DecorrelationConfig`] of a decorrelated model (or of the first module inside it that has one), else
    None."""
    for module in model.modules():
        own = module.__dict__.get(MODULE_ATTRIBUTE)
        if isinstance(own, DecorrelationConfig):
            return own
        values = getattr(getattr(module, "config", None), CONFIG_ATTRIBUTE, None)
        if isinstance(values, Mapping):
            return DecorrelationConfig.from_dict(dict(values))
    return None


def is_decorrelated(model: nn.Module) -> bool:
    """Whether `model` holds an R or a [`DecorrelationConfig`] (a model decorrelated with an empty plan counts: a
    backbone whose R were folded in, say)."""
    return bool(decorrelation_modules(model)) or decorrelation_config_of(model) is not None


def decorrelation_modules(model: nn.Module) -> list[Decorrelation]:
    """Every [`~hf_dbp.core.decorrelation.Decorrelation`] (one R each) of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, Decorrelation)]


def defer_weight_gradients(model: nn.Module, is_last_micro_batch: Callable[[], bool] | None) -> None:
    """Under gradient accumulation, map the gradient of each reused fold `W R` to W once per optimizer step.

    Where the fold is reused across the micro-batches of a step (`Decorrelation.reuse_fold_in_training`), each
    backward turns the fold's gradient into W's (`dW = dF R^T`), which costs as much as the fold itself. With
    `is_last_micro_batch` (a function that is True while the step's last micro-batch runs, such as accelerate's
    `GradientState().sync_gradients` under `accelerator.accumulate` or Trainer), the other micro-batches only add `dF`
    to a sum, W's gradient stays unset there, and the last one maps the whole sum: the same gradient up to float
    rounding, with one product per step instead of one per micro-batch. `None` turns it off.

    Only where nothing reads or reduces W's gradient before the last micro-batch: a single process, or DDP under
    `no_sync` until the last micro-batch. Not under FSDP or DeepSpeed, which reduce or partition the gradient of
    every micro-batch as it comes. The optimizer-step hook ([`~hf_dbp.DecorrelationHook`]) raises if a step finds a
    sum still waiting.
    """
    for d in decorrelation_modules(model):
        d.is_last_micro_batch = is_last_micro_batch


def waiting_weight_gradients(model: nn.Module) -> list[str]:
    """The decorrelated layers of `model` holding a sum of fold gradients not yet given to W
    ([`defer_weight_gradients`])."""
    return [
        name for name, module in model.named_modules() if getattr(module, "_pending_folded_grad", None) is not None
    ]


def _modules_and_settings(model, lr, kappa, kwargs) -> tuple[list[Decorrelation], float, float]:
    if not isinstance(model, nn.Module):
        modules = list(model)
        if lr is None or kappa is None:
            raise ValueError("the decorrelation step of Decorrelation modules needs lr and kappa")
        return modules, lr, kappa
    config = decorrelation_config_of(model)
    if config is None and (lr is None or kappa is None):
        raise ValueError(
            f"{type(model).__name__} is not decorrelated (no DecorrelationConfig): call hf_dbp.decorrelate(model, "
            "config) first"
        )
    if config is not None:
        kwargs.setdefault("variance_form", config.variance_form)
    return decorrelation_modules(model), config.lr if lr is None else lr, config.kappa if kappa is None else kappa


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
    each optimizer step (or let `hf_dbp.attach_decorrelation` call it for you).

    Args:
        model (`nn.Module` or an iterable of `Decorrelation`):
            A decorrelated model (its [`DecorrelationConfig`] gives `lr`, `kappa` and the variance form unless
            passed), or the `Decorrelation` modules themselves (`lr` and `kappa` then required).
        lr (`float`, *optional*), kappa (`float`, *optional*):
            Override the config's.
        lr_scale (`float`, defaults to 1.0):
            Multiplies the lr (e.g. the weights' schedule factor).
        kwargs:
            `max_loss`, `on_divergence`, `process_group`, `pending` (from `begin_decorrelation_step`),
            `transfer_dtype`, `update`, `batch_updates`: see `hf_dbp.core.step.update_decorrelations`.

    Returns:
        The mean decorrelation loss over the layers that saw rows, or None if no training forward ran.
    """
    modules, lr, kappa = _modules_and_settings(model, lr, kappa, kwargs)
    return update_decorrelations(modules, lr * lr_scale, kappa, **kwargs)


def begin_decorrelation_step(
    model: nn.Module | Iterable[Decorrelation], process_group=None, transfer_dtype: torch.dtype | str | None = None
) -> PendingStatistics:
    """Start the next `decorrelation_step` of `model` early: after the forward of an optimizer step's last
    micro-batch, so that over several processes the statistics travel while the backward runs. Pass the result as
    `decorrelation_step(model, pending=...)`:

    ```python
    loss = model(**batch).loss
    pending = hf_dbp.begin_decorrelation_step(model)
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    hf_dbp.decorrelation_step(model, pending=pending)
    ```
    """
    modules = decorrelation_modules(model) if isinstance(model, nn.Module) else list(model)
    return _begin_exchange(modules, process_group, transfer_dtype)


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


def _sub_configs(config: PreTrainedConfig) -> list[PreTrainedConfig]:
    return [value for value in vars(config).values() if isinstance(value, PreTrainedConfig)]


def from_pretrained_checked(model_class, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
    """`model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)`, raising a `ValueError` that names the
    weights file, the tensor and both shapes when a tensor of the checkpoint (an R, a weight) does not have the shape
    of the model its config builds (transformers raises a `RuntimeError` pointing at a table in its log instead).
    With `output_loading_info=True` returns `(model, info)` as `from_pretrained` does; an explicit
    `ignore_mismatched_sizes=True` keeps transformers' behaviour (such tensors are initialised afresh)."""
    if kwargs.get("ignore_mismatched_sizes"):
        return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    with_info = kwargs.pop("output_loading_info", False)
    model, info = model_class.from_pretrained(
        pretrained_model_name_or_path, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
    )
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda entry: entry[0])
    if mismatched:
        key, found, expected = mismatched[0]
        weights = os.path.join(pretrained_model_name_or_path, "model.safetensors")
        where = weights if os.path.isfile(weights) else str(pretrained_model_name_or_path)
        what = (
            "R is square, its side the width of the input it decorrelates (block-diagonal: its blocks, as set by "
            "decorrelation.block_size): "
            if key.endswith(".R")
            else ""
        )
        raise ValueError(
            f"{where}: {key} has shape {tuple(found)}, the model its config describes needs {tuple(expected)} "
            f"({what}the checkpoint does not match its config.json or the model asked for)"
            + (f"; {len(mismatched) - 1} more tensors differ" if len(mismatched) > 1 else "")
        )
    return (model, info) if with_info else model


def load_decorrelated(model_class, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load a model saved by a decorrelated transformers model's `save_pretrained`: the same model back, every R exact.

    Args:
        model_class: an Auto class (`AutoModelForCausalLM`, ...) or a model class.
        pretrained_model_name_or_path: a folder or Hub repo whose config.json has a `decorrelation` entry (or one of
            its sub-configs has, as a backbone's).
        **kwargs: passed to `from_pretrained` (`dtype`, `device_map`, `revision`, `token`, ...). R stays float32.
    """
    from transformers import AutoConfig

    config = kwargs.pop("config", None)
    if config is None:
        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "trust_remote_code", "subfolder")
        config = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **{k: kwargs[k] for k in hub_keys if k in kwargs}
        )
    values = getattr(config, CONFIG_ATTRIBUTE, None)
    model_class = _resolve_class(model_class, config)
    # Classes that put their R in place themselves, from their config (ViTMAE-DBP, a model with such a backbone):
    # their own from_pretrained loads every R.
    nested = any(isinstance(getattr(sub, CONFIG_ATTRIBUTE, None), Mapping) for sub in _sub_configs(config))
    if getattr(model_class, "decorrelates_on_init", False) or (values is None and nested):
        return from_pretrained_checked(model_class, pretrained_model_name_or_path, config=config, **kwargs)
    if not isinstance(values, Mapping) or not values.get("groups"):
        raise ValueError(
            f"{pretrained_model_name_or_path} is not a decorrelated checkpoint (its config has no '{CONFIG_ATTRIBUTE}' "
            "entry with groups); load it with from_pretrained and call hf_dbp.decorrelate"
        )
    decorrelation = DecorrelationConfig.from_dict(dict(values))
    with _decorrelate_on_construction(model_class, decorrelation):
        model, info = from_pretrained_checked(
            model_class, pretrained_model_name_or_path, config=config, output_loading_info=True, **kwargs
        )
    missing = [key for key in info["missing_keys"] if key.endswith("_decorrelation.R")]
    if missing:
        raise ValueError(
            f"{pretrained_model_name_or_path} lacks the decorrelation matrices {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}: the checkpoint does not match its config"
        )
    return model


def is_decorrelated_config(config: PreTrainedConfig) -> bool:
    """Whether a transformers config (or one of its sub-configs, as a backbone's) holds a decorrelation plan with at
    least one R: what `hf-dbp merge` folds."""
    return any(
        isinstance(values := getattr(c, CONFIG_ATTRIBUTE, None), Mapping) and bool(values.get("groups"))
        for c in [config, *_sub_configs(config)]
    )


@torch.no_grad()
def merge_decorrelation(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` with every R folded into its layers' weights (`W <- W R`), plain layers again and no R left.

    The result gives the same outputs and has no overhead: a transformers model saves and loads with transformers
    alone, any other module with its own code. By default `model` is left unchanged (the merge works on a copy);
    `inplace=True` saves the copy's memory (like PEFT's `merge_and_unload`). A model class that knows a plain twin of
    its own (`model.merge_decorrelation()`, e.g. ViTMAE-DBP's transformers ViTMAE) returns that.
    """
    own = getattr(model, "merge_decorrelation", None)
    if callable(own):
        return own()
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, DECORRELATED_LAYERS):
            plain_class = PLAIN_LAYERS[type(module)]
            plain = plain_class.__new__(plain_class)
            ours = ("record_statistics", "_folded_cache", "_pending_folded_grad", "decorrelation")
            plain.__dict__.update(
                {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items() if k not in ours}
            )
            plain.weight = nn.Parameter(module.folded_weight().detach().clone(), module.weight.requires_grad)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, plain)
    for name, module in list(model.named_modules()):
        if isinstance(module, Decorrelation):
            parent, _, leaf = name.rpartition(".")
            delattr(model.get_submodule(parent), leaf)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            kept = module._keep_in_fp32_modules_strict or []
            module._keep_in_fp32_modules_strict = {n for n in kept if not n.endswith("_decorrelation")}
        set_decorrelation_config(module, None)
    return model


__all__ = [
    "from_pretrained_checked",
    "begin_decorrelation_step",
    "is_decorrelated_config",
    "decorrelate",
    "decorrelation_config_of",
    "decorrelation_modules",
    "decorrelation_step",
    "is_decorrelated",
    "load_decorrelated",
    "merge_decorrelation",
]
