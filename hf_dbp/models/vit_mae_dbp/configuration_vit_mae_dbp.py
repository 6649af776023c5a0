"""Configuration of a ViTMAE model whose encoder is trained with decorrelated backpropagation (DBP)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

from ...core.config import DecorrelationConfig, check_block_size, check_step_settings
from ...target_modules import VIT_LAYER_KINDS, layer_kind_targets, layer_kinds_of
from .remote_code import save_pretrained_with_remote_code

DECORRELATION_LAYER_KINDS = VIT_LAYER_KINDS
"""Encoder layer kinds that can be decorrelated: the patch embedding conv, the q/k/v projections (one shared R),
the attention output projection, and the two MLP linears."""

_SETTINGS = {
    "lr": "decorrelation_lr",
    "kappa": "decorrelation_kappa",
    "sample_fraction": "decorrelation_sample_fraction",
    "variance_form": "decorrelation_variance_form",
}
"""The `DecorrelationConfig` fields that ViTMAE-DBP also takes as its own keyword arguments, and those names."""
LEGACY_FIELDS = (*_SETTINGS.values(), "decorrelation_layers")
"""Keyword arguments of the DBP settings (and the fields of `config.json` written by hf-dbp before 0.2)."""


def vit_mae_decorrelation_config(kinds=VIT_LAYER_KINDS, **settings) -> DecorrelationConfig:
    """The [`DecorrelationConfig`] that decorrelates the layer `kinds` of a ViTMAE encoder and leaves its decoder alone
    (as `hf_dbp.decorrelate` would with these targets); `settings` are its other fields (`lr`, `kappa`, ...)."""
    return DecorrelationConfig(
        target_modules=layer_kind_targets("vit_mae", list(kinds)), exclude_modules=r"(.*\.)?decoder(\..*)?", **settings
    )


def _kind_property(name: str, field: str) -> property:
    def get(self):
        return self.decorrelation[field]

    def set(self, value):
        settings = {**DecorrelationConfig.from_dict(self.decorrelation).to_dict(), field: value}
        # Named as the user named it: `decorrelation_lr must be a number >= 0`.
        check_step_settings(*(settings[f] for f in _SETTINGS), prefix="decorrelation_")
        check_block_size(settings["block_size"], prefix="decorrelation_")
        self.decorrelation = DecorrelationConfig.from_dict(settings).to_dict()

    return property(get, set, doc=f"`decorrelation[{field!r}]`, under the name `{name}`.")


@strict
class ViTMAEDBPConfig(ViTMAEConfig):
    r"""
    Configuration of [`ViTMAEDBPModel`] and [`ViTMAEDBPForPreTraining`]: a [`~transformers.ViTMAEConfig`] plus a
    [`DecorrelationConfig`], the same class that holds the settings of every model decorrelated with hf-dbp. Every
    ViTMAE argument keeps its meaning; the decoder is never decorrelated.

    Args:
        decorrelation (`dict`, *optional*):
            The [`DecorrelationConfig`] as a dict (`DecorrelationConfig.to_dict()`): the step's settings and which
            encoder layers are decorrelated (their `target_modules`, and the plan `groups`, filled in by the model).
            Defaults to all five layer kinds with the settings below.
        decorrelation_lr (`float`, *optional*, defaults to 1e-3):
            Step size of the update of each decorrelation matrix R, taken after every optimizer step. `0.0` keeps R
            fixed (at the identity for a fresh model). Stored as `decorrelation["lr"]`.
        decorrelation_kappa (`float`, *optional*, defaults to 1e-2):
            Balance between decorrelation (`0.0`) and variance normalisation (`1.0`) in the update; in between R
            whitens its inputs. Stored as `decorrelation["kappa"]`.
        decorrelation_sample_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the rows (tokens, or image patches for the patch embedding) of each training forward used
            for R's statistics, in (0, 1]. The forward decorrelates every row regardless.
        decorrelation_layers (`list[str]`, *optional*, defaults to all five kinds):
            Which encoder layers are decorrelated, out of `"patch_embeddings"`, `"qkv"`, `"o_proj"`, `"fc1"` and
            `"fc2"` (`hf_dbp.target_modules.VIT_LAYER_KINDS`); stored as their `target_modules`. `[]`: none (a plain
            encoder).
        decorrelation_variance_form (`str`, *optional*, defaults to `"rows"`):
            Where the update applies the variance term: `"rows"` (`diag(v) R`, the method's rule) or `"columns"`
            (`R diag(v)`, what the reference code artcogsys/decorbp computes).
        decorrelation_block_size (`int`, *optional*):
            Make every R block-diagonal, with blocks of at most this many inputs (see
            [`DecorrelationConfig`]'s `block_size`); `None` (default): full R. Stored as `decorrelation["block_size"]`.

    The `decorrelation_*` names read and write the same `decorrelation` dict; `config.json` holds only that dict.
    Checkpoints saved before hf-dbp 0.2, with these names as fields of their own, load unchanged.

    Example:

    ```python
    >>> import hf_dbp
    >>> from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining

    >>> config = ViTMAEDBPConfig(decorrelation_lr=1e-3, decorrelation_layers=["qkv", "fc1"])
    >>> model = ViTMAEDBPForPreTraining(config)
    ```"""

    model_type = "vit_mae_dbp"

    # Saved with its code for `trust_remote_code` (see remote_code; not inherited by subclasses).
    _remote_code_auto_class = "AutoConfig"

    decorrelation: dict | None = None

    decorrelation_lr = _kind_property("decorrelation_lr", "lr")
    decorrelation_kappa = _kind_property("decorrelation_kappa", "kappa")
    decorrelation_sample_fraction = _kind_property("decorrelation_sample_fraction", "sample_fraction")
    decorrelation_variance_form = _kind_property("decorrelation_variance_form", "variance_form")
    decorrelation_block_size = _kind_property("decorrelation_block_size", "block_size")

    @property
    def decorrelation_layers(self) -> list[str]:
        """The layer kinds the encoder decorrelates (`[]` for a plain encoder)."""
        targets = self.decorrelation["target_modules"]
        kinds = layer_kinds_of("vit_mae", targets)
        if kinds is None:
            raise ValueError(
                f"decorrelation.target_modules {targets!r} are not layer kinds of {list(VIT_LAYER_KINDS)}"
            )
        return kinds

    @decorrelation_layers.setter
    def decorrelation_layers(self, kinds) -> None:
        try:
            targets = layer_kind_targets("vit_mae", list(kinds))
        except ValueError as error:
            raise ValueError(f"decorrelation_layers has {error}") from None
        settings = DecorrelationConfig.from_dict(self.decorrelation).to_dict()
        settings.update(target_modules=targets, groups=None)
        self.decorrelation = DecorrelationConfig.from_dict(settings).to_dict()

    def save_pretrained(self, save_directory, **kwargs):
        # With its code, flattened (see remote_code): transformers' copy cannot follow the imports of hf_dbp.core.
        return save_pretrained_with_remote_code(self, super().save_pretrained, save_directory, **kwargs)

    def __post_init__(self, **kwargs):
        legacy = {name: kwargs.pop(name) for name in LEGACY_FIELDS if name in kwargs}
        block_size = kwargs.pop("decorrelation_block_size", None)
        if self.decorrelation is None:
            self.decorrelation = vit_mae_decorrelation_config().to_dict()
        settings = DecorrelationConfig.from_dict(dict(self.decorrelation))  # checks every field
        self.decorrelation = settings.to_dict()
        self.decorrelation_layers  # noqa: B018 - refuses targets that are not layer kinds
        for name in _SETTINGS.values():
            if name in legacy:
                setattr(self, name, legacy[name])
        if "decorrelation_layers" in legacy:
            kinds = legacy["decorrelation_layers"]
            self.decorrelation_layers = VIT_LAYER_KINDS if kinds is None else kinds
        if block_size is not None:
            self.decorrelation_block_size = block_size
        super().__post_init__(**kwargs)

    def check_decorrelation_fields(self) -> None:
        """Raise a `ValueError` naming the first DBP setting whose value cannot work."""
        DecorrelationConfig.from_dict(self.decorrelation)
        self.decorrelation_layers  # noqa: B018

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Read a `vit_mae_dbp` or plain `vit_mae` config; refuse any other model type with a clear message."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type", cls.model_type)
        # A plain ViTMAE checkpoint is the normal starting point: it becomes a DBP model with R = identity. A DBP
        # config is read by its subclasses (the backbone) too.
        if model_type in (ViTMAEConfig.model_type, ViTMAEDBPConfig.model_type):
            config_dict = {**config_dict, "model_type": cls.model_type}
        elif model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a model of type {model_type!r}; ViTMAEDBP models load "
                f"checkpoints of type 'vit_mae' (e.g. facebook/vit-mae-base) or 'vit_mae_dbp'."
            )
        return config_dict, kwargs


__all__ = ["DECORRELATION_LAYER_KINDS", "ViTMAEDBPConfig", "vit_mae_decorrelation_config"]
