"""ViTMAE with a decorrelated encoder (DBP-MAE).

The model classes are transformers' ViTMAE classes with the encoder layers that `config.decorrelation` (a
`DecorrelationConfig`) targets wrapped by `hf_dbp.core.inject.inject_decorrelation`, as `hf_dbp.decorrelate` would
wrap them. Parameter names are unchanged, so any plain ViTMAE checkpoint (5.x key layout or the older 4.x one) loads
with R = identity and gives the plain model's outputs; the only new keys are the `*_decorrelation.R` matrices.
"""

from __future__ import annotations

import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder, ViTMAEPreTrainedModel

from ...core.config import DecorrelationConfig
from ...core.decorrelation import Decorrelation, identity_like
from ...core.inject import decorrelation_module_name, fold_decorrelation, inject_decorrelation
from ...core.sampling import RowSampler
from ...core.step import update_decorrelations
from .configuration_vit_mae_dbp import DECORRELATION_LAYER_KINDS, LEGACY_FIELDS, ViTMAEDBPConfig
from .remote_code import save_pretrained_with_remote_code


def vit_mae_decorrelation_groups(num_hidden_layers: int, kinds=DECORRELATION_LAYER_KINDS) -> dict[str, list[str]]:
    """The plan of the layer `kinds` of a ViTMAE encoder (a `ViTMAEModel`): each R's name and the layers that read
    its output. q, k and v read the same input and share one R.

    It is the plan `hf_dbp.plan_decorrelation` traces for the same targets (tested), built without a forward so that
    a model built on the meta device (`from_pretrained`) has it. Paths follow transformers 5.x module names
    (`layers.N.attention.q_proj`, `layers.N.mlp.fc1`, ...).
    """
    groups = {}
    if "patch_embeddings" in kinds:
        groups["embeddings.patch_embeddings.projection"] = ["embeddings.patch_embeddings.projection"]
    for i in range(num_hidden_layers):
        prefix = f"layers.{i}"
        if "qkv" in kinds:
            groups[f"{prefix}.attention.qkv"] = [f"{prefix}.attention.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        if "o_proj" in kinds:
            groups[f"{prefix}.attention.o_proj"] = [f"{prefix}.attention.o_proj"]
        for fc in ("fc1", "fc2"):
            if fc in kinds:
                groups[f"{prefix}.mlp.{fc}"] = [f"{prefix}.mlp.{fc}"]
    return groups


def plain_vit_mae_config(config: ViTMAEDBPConfig, architecture: str) -> ViTMAEConfig:
    """The ViTMAE configuration of a DBP configuration, without the DBP fields."""
    # No auto_map either: a plain checkpoint carries no hf_dbp code for trust_remote_code to point to.
    values = {k: v for k, v in config.to_dict().items() if k not in ("decorrelation", *LEGACY_FIELDS, "auto_map")}
    values.update(model_type=ViTMAEConfig.model_type, architectures=[architecture])
    return ViTMAEConfig.from_dict(values)


class ViTMAEDBPPreTrainedModel(ViTMAEPreTrainedModel):
    """Base class of the DBP-MAE models: weight initialisation of R, the DBP step, and merging R into W."""

    config_class = ViTMAEDBPConfig
    config: ViTMAEDBPConfig
    # A plain ViTMAE checkpoint has no R: it starts at the identity by design, so its absence is not reported.
    _keys_to_ignore_on_load_missing = [r"_decorrelation\.R$"]
    # The transformers class whose checkpoints this model loads and whose kind `merge_decorrelation` returns.
    _plain_class: type[ViTMAEPreTrainedModel]

    def save_pretrained(self, save_directory, **kwargs):
        # With its code, flattened (see remote_code): transformers' copy cannot follow the imports of hf_dbp.core.
        return save_pretrained_with_remote_code(self, super().save_pretrained, save_directory, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Decorrelation):
            # R starts at the identity: a fresh DBP model, or one loaded from a plain checkpoint, is the plain model.
            init.copy_(module.R, identity_like(module.R))

    # hf_dbp.load_decorrelated: these classes put their R in place themselves, from their config.
    decorrelates_on_init = True

    def decorrelation_modules(self) -> list[Decorrelation]:
        """Every [`~hf_dbp.core.decorrelation.Decorrelation`] (one R each) of the encoder, in module order."""
        return [m for m in self.modules() if isinstance(m, Decorrelation)]

    def decorrelation_step(self, lr_scale: float = 1.0, **kwargs) -> float | None:
        """`hf_dbp.decorrelation_step(self, ...)`: update every R after an optimizer step, with the settings of
        `config.decorrelation` (the lr times `lr_scale`). Returns the mean decorrelation loss, or None if no training
        forward ran."""
        # As hf_dbp.decorrelation_step does it; called here directly so that the code a checkpoint carries stays small.
        settings = DecorrelationConfig.from_dict(self.config.decorrelation)
        kwargs.setdefault("variance_form", settings.variance_form)
        return update_decorrelations(self.decorrelation_modules(), settings.lr * lr_scale, settings.kappa, **kwargs)

    @torch.no_grad()
    def merge_decorrelation(self) -> ViTMAEPreTrainedModel:
        """A plain transformers model with every R folded into its layer's weight (`W <- W R`).

        The result has the same outputs, no overhead, and loads anywhere without hf_dbp. This model is unchanged.
        """
        architecture = self._plain_class.__name__
        plain = self._plain_class(plain_vit_mae_config(self.config, architecture))
        plain.load_state_dict(fold_decorrelation(self), strict=True)
        reference = next(self.parameters())
        return plain.to(device=reference.device, dtype=reference.dtype).train(self.training)


class ViTMAEDBPModel(ViTMAEDBPPreTrainedModel, ViTMAEModel):
    """
    The ViTMAE encoder with the layers `config.decorrelation` targets decorrelated. `forward` takes the same
    arguments and returns the same [`~transformers.models.vit_mae.modeling_vit_mae.ViTMAEModelOutput`] as
    [`~transformers.ViTMAEModel`].

    Args:
        config ([`ViTMAEDBPConfig`]): model configuration.
    """

    _plain_class = ViTMAEModel
    _remote_code_auto_class = "AutoModel"  # saved with its code (see remote_code)

    def __init__(self, config: ViTMAEDBPConfig):
        super().__init__(config)
        groups = vit_mae_decorrelation_groups(config.num_hidden_layers, config.decorrelation_layers)
        settings = DecorrelationConfig.from_dict(config.decorrelation).replace(groups=groups)
        inject_decorrelation(
            self,
            groups,
            sample_fraction=settings.sample_fraction,
            generator=RowSampler(settings.seed),
            block_size=settings.block_size,
        )
        config.decorrelation = settings.to_dict()  # the plan, saved with the model as every decorrelated model's
        # R and its statistics stay in float32 when the rest of the model is loaded in half precision. transformers
        # matches these entries as whole dotted name parts (`qkv_decorrelation` of `layers.0.attention.
        # qkv_decorrelation.R`), so they name exactly the R this config has; models holding this one (pre-training,
        # backbone, UperNet) collect them in their `post_init`.
        self._keep_in_fp32_modules_strict = {decorrelation_module_name(group) for group in groups}


class ViTMAEDBPForPreTraining(ViTMAEDBPPreTrainedModel, ViTMAEForPreTraining):
    """
    The ViTMAE masked autoencoder for pre-training, with a decorrelated encoder ([`ViTMAEDBPModel`]) and the plain
    decoder. `forward` takes the same arguments (`pixel_values`, `noise`, `interpolate_pos_encoding`, ...) and returns
    the same [`~transformers.models.vit_mae.modeling_vit_mae.ViTMAEForPreTrainingOutput`] as
    [`~transformers.ViTMAEForPreTraining`].

    Args:
        config ([`ViTMAEDBPConfig`]): model configuration.

    Example:

    ```python
    >>> import hf_dbp
    >>> from hf_dbp import ViTMAEDBPForPreTraining

    >>> model = ViTMAEDBPForPreTraining.from_pretrained("facebook/vit-mae-base", decorrelation_lr=1e-3)
    >>> loss = model(pixel_values).loss
    >>> loss.backward(); optimizer.step(); optimizer.zero_grad()
    >>> model.decorrelation_step()  # after every optimizer step
    >>> plain = model.merge_decorrelation()  # a transformers.ViTMAEForPreTraining
    ```
    """

    _plain_class = ViTMAEForPreTraining
    _remote_code_auto_class = "AutoModelForPreTraining"  # saved with its code (see remote_code)

    def __init__(self, config: ViTMAEDBPConfig):
        # Same as ViTMAEForPreTraining.__init__, with the decorrelated encoder in place of ViTMAEModel.
        ViTMAEPreTrainedModel.__init__(self, config)
        self.config = config
        self.vit = ViTMAEDBPModel(config)
        self.decoder = ViTMAEDecoder(config, num_patches=self.vit.embeddings.patch_embeddings.num_patches)
        self.post_init()


# transformers converts checkpoint keys between its 4.x and 5.x layouts (vit.encoder.layer.N.attention.attention.query
# <-> vit.layers.N.attention.q_proj; saving writes the 4.x layout) only for classes it knows, by class name. Ours take
# the renamings of the classes they extend. Done here, not in hf_dbp/__init__, so that the copy of this file that a
# checkpoint carries for `trust_remote_code=True` loads its weights too.
for _ours, _theirs in (("ViTMAEDBPForPreTraining", "ViTMAEForPreTraining"), ("ViTMAEDBPModel", "ViTMAEModel")):
    register_checkpoint_conversion_mapping(_ours, get_checkpoint_conversion_mapping(_theirs), overwrite=True)


__all__ = [
    "ViTMAEDBPPreTrainedModel",
    "ViTMAEDBPModel",
    "ViTMAEDBPForPreTraining",
    "vit_mae_decorrelation_groups",
]
