"""Configuration of a ViTMAE model whose encoder is trained with decorrelated backpropagation (DBP)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

from ...core.config import check_step_settings
from .remote_code import save_pretrained_with_remote_code

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

    # Saved with its code for `trust_remote_code` (see remote_code; not inherited by subclasses).
    _remote_code_auto_class = "AutoConfig"

    def save_pretrained(self, save_directory, **kwargs):
        # With its code, flattened (see remote_code): transformers' copy cannot follow the imports of hf_dbp.core.
        return save_pretrained_with_remote_code(self, super().save_pretrained, save_directory, **kwargs)

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

        check_step_settings(
            self.decorrelation_lr,
            self.decorrelation_kappa,
            self.decorrelation_sample_fraction,
            self.decorrelation_variance_form,
            "decorrelation_",
        )
        unknown = [kind for kind in self.decorrelation_layers if kind not in DECORRELATION_LAYER_KINDS]
        if unknown:
            raise ValueError(
                f"decorrelation_layers has unknown kinds {unknown}; choose from {list(DECORRELATION_LAYER_KINDS)}"
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
