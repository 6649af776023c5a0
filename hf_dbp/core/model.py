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
decorrelated twin (`hf_dbp.core.decorrelation`), and each R is registered beside the layers that read it, as
`<parent>.<name>_decorrelation.R`. The model's config carries the `DecorrelationConfig` (with its resolved `groups`) as
`config.decorrelation`, so every `save_pretrained`, Trainer checkpoint and `push_to_hub` carries it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import CONFIG_ATTRIBUTE, DecorrelationConfig
from .decorrelation import (
    DECORRELATED_LAYERS,
    PLAIN_LAYERS,
    Decorrelation,
    PendingStatistics,
    RowSampler,
    decorrelation_module_name,
    inject_decorrelation,
)
from .decorrelation import begin_decorrelation_step as _begin_update
from .decorrelation import decorrelation_step as _update_decorrelations
from .plan import plan_decorrelation


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
    `kappa` are required. Other keyword arguments (`max_loss`, `on_divergence`, `process_group`, `pending` from
    `begin_decorrelation_step`, `transfer_dtype`, `update`) are those of
    `hf_dbp.core.decorrelation.decorrelation_step`. Returns the mean decorrelation loss, or None if no forward ran.
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


def begin_decorrelation_step(model: nn.Module | Iterable[Decorrelation], process_group=None) -> PendingStatistics:
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
    return _begin_update(modules, process_group)


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
    "begin_decorrelation_step",
    "decorrelate",
    "decorrelation_config_of",
    "decorrelation_modules",
    "decorrelation_step",
    "load_decorrelated",
    "merge_decorrelation",
]
