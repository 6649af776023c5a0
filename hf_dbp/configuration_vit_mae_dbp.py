"""Configuration of a ViTMAE model whose encoder is trained with decorrelated backpropagation (DBP)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

from .decorrelation import VARIANCE_FORMS

DECORRELATION_LAYER_KINDS = ("patch_embeddings", "qkv", "o_proj", "fc1", "fc2")
"""Encoder layer kinds that can be decorrelated: the patch embedding conv, the q/k/v projections (one shared R),
the attention output projection, and the two MLP linears."""

DBP_CONFIG_FIELDS = (
    "decorrelation_lr",
    "decorrelation_kappa",
    "decorrelation_sample_fraction",
    "decorrelation_layers",
    "decorrelation_variance_form",
)


@strict
class ViTMAEDBPConfig(ViTMAEConfig):
    r"""
    Configuration of [`ViTMAEDBPModel`] and [`ViTMAEDBPForPreTraining`]: a [`~transformers.ViTMAEConfig`] plus the
    settings of decorrelated backpropagation. Every ViTMAE argument keeps its meaning; the decoder is never
    decorrelated.

    Args:
        decorrelation_lr (`float`, *optional*, defaults to 1e-3):
            Step size of the update of each decorrelation matrix R, taken after every optimizer step.
            `0.0` keeps R fixed (at the identity for a fresh model).
        decorrelation_kappa (`float`, *optional*, defaults to 1e-2):
            Balance between decorrelation (`0.0`) and variance normalisation (`1.0`) in the update; in between R
            whitens its inputs.
        decorrelation_sample_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the rows (tokens, or image patches for the patch embedding) of each training forward used
            for R's statistics, in (0, 1]. `1.0` uses every row exactly once; below that, a random subset without
            replacement. The forward decorrelates every row regardless.
        decorrelation_layers (`list[str]`, *optional*, defaults to all five kinds):
            Which encoder layers are decorrelated, out of `"patch_embeddings"`, `"qkv"`, `"o_proj"`, `"fc1"` and
            `"fc2"`.
        decorrelation_variance_form (`str`, *optional*, defaults to `"rows"`):
            Where the update applies the variance term: `"rows"` (`diag(v) R`, the method's rule, which normalises
            the variance of each output of R) or `"columns"` (`R diag(v)`, what the reference code artcogsys/decorbp
            computes, to reproduce it exactly or to ablate the difference). The two agree while R commutes with
            `diag(v)`, e.g. at the first step from R = I.

    Example:

    ```python
    >>> import hf_dbp
    >>> from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining

    >>> config = ViTMAEDBPConfig(decorrelation_lr=1e-3, decorrelation_layers=["qkv", "fc1"])
    >>> model = ViTMAEDBPForPreTraining(config)
    ```"""

    model_type = "vit_mae_dbp"

    def __init_subclass__(cls, *args, **kwargs):
        super().__init_subclass__(*args, **kwargs)
        # As for the models (see ViTMAEDBPPreTrainedModel): only a class registered by its own call saves its source.
        cls._auto_class = None

    decorrelation_lr: float = 1e-3
    decorrelation_kappa: float = 1e-2
    decorrelation_sample_fraction: float = 0.1
    decorrelation_layers: list[str] | tuple[str, ...] | None = None
    decorrelation_variance_form: str = "rows"

    def __post_init__(self, **kwargs):
        self.decorrelation_layers = list(
            DECORRELATION_LAYER_KINDS if self.decorrelation_layers is None else self.decorrelation_layers
        )
        self.check_decorrelation_fields()
        super().__post_init__(**kwargs)

    def check_decorrelation_fields(self) -> None:
        """Raise a `ValueError` naming the first DBP field whose value cannot work."""

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (is_number(self.decorrelation_lr) and self.decorrelation_lr >= 0):
            raise ValueError(f"decorrelation_lr must be a number >= 0, got {self.decorrelation_lr!r}")
        if not (is_number(self.decorrelation_kappa) and 0.0 <= self.decorrelation_kappa <= 1.0):
            raise ValueError(f"decorrelation_kappa must be a number in [0, 1], got {self.decorrelation_kappa!r}")
        fraction = self.decorrelation_sample_fraction
        if not (is_number(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"decorrelation_sample_fraction must be a number in (0, 1], got {fraction!r}")
        unknown = [kind for kind in self.decorrelation_layers if kind not in DECORRELATION_LAYER_KINDS]
        if unknown:
            raise ValueError(
                f"decorrelation_layers has unknown kinds {unknown}; choose from {list(DECORRELATION_LAYER_KINDS)}"
            )
        if self.decorrelation_variance_form not in VARIANCE_FORMS:
            raise ValueError(
                f"decorrelation_variance_form must be one of {list(VARIANCE_FORMS)}, got "
                f"{self.decorrelation_variance_form!r}"
            )
        if len(set(self.decorrelation_layers)) != len(self.decorrelation_layers):
            raise ValueError(f"decorrelation_layers lists a kind twice: {self.decorrelation_layers}")

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


__all__ = ["ViTMAEDBPConfig", "DECORRELATION_LAYER_KINDS"]
