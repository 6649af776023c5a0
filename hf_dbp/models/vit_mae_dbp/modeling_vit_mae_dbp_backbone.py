"""A (DBP-)MAE encoder as a dense-prediction backbone: multi-scale features for UperNet, as in BEiT and MAE.

The MAE recipe for ADE20K takes the outputs of blocks 4, 6, 8 and 12 of a ViT-B (1-based), reshapes them to the
patch grid, and passes them through a BEiT-style neck that rescales them by x4, x2, x1 and x0.5. The encoder runs
with no masking and no token shuffle, at any input size (position embeddings interpolated, square or not).
"""

from __future__ import annotations

import logging
import os

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, UperNetConfig, UperNetForSemanticSegmentation, ViTMAEConfig
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput
from transformers.models.beit.modeling_beit import BeitDropPath, BeitFPNNeck
from transformers.utils.generic import can_return_tuple

from ...core.inject import decorrelation_matrices
from .configuration_vit_mae_dbp import ViTMAEDBPConfig
from .modeling_vit_mae_dbp import ViTMAEDBPForPreTraining, ViTMAEDBPModel, ViTMAEDBPPreTrainedModel

logger = logging.getLogger(__name__)


def default_out_indices(num_hidden_layers: int) -> list[int]:
    """Blocks 4, 6, 8 and 12 (1-based) for 12 blocks, the MAE/BEiT recipe; the same fractions for other depths."""
    if num_hidden_layers < 4:
        raise ValueError(f"the multi-scale neck needs 4 distinct blocks, the encoder has {num_hidden_layers}")
    indices = [int(num_hidden_layers * k / 12 + 0.5) for k in (4, 6, 8)] + [num_hidden_layers]
    for i in range(1, 4):  # keep them distinct and increasing for small depths (5 blocks: 2, 3, 4, 5)
        indices[i] = max(indices[i], indices[i - 1] + 1)
    for i in range(2, -1, -1):
        indices[i] = min(indices[i], indices[i + 1] - 1)
    return indices


@strict
class ViTMAEDBPBackboneConfig(BackboneConfigMixin, ViTMAEDBPConfig):
    r"""
    Configuration of [`ViTMAEDBPBackbone`]: the encoder fields of [`ViTMAEDBPConfig`] plus the backbone's outputs.

    Args:
        out_indices (`list[int]`, *optional*):
            Which stages to output: 0 is the patch embedding, `k` the output of block `k` (1-based). Defaults to
            blocks 4, 6, 8, 12 for 12 blocks, spread the same way for other depths.
        out_features (`list[str]`, *optional*):
            The same by name (`"stem"`, `"stage1"`, ...).
        add_fpn (`bool`, *optional*, defaults to `True`):
            Rescale the four outputs by x4, x2, x1 and x0.5 with BEiT's neck (what UperNet on a plain ViT needs).
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth during training: block i of L drops its attention and MLP branches (per sample) with
            probability `drop_path_rate * i / (L - 1)`, as BEiT and MAE fine-tune (0.1 for ViT-B on ADE20K).
        decorrelation_layers (`list[str]`):
            As in [`ViTMAEDBPConfig`]; an empty list gives a plain encoder (the usual case after folding R into W).

    The encoder never masks: `mask_ratio` is always 0.
    """

    # Never saved with its source as remote code (see ViTMAEDBPConfig.__init_subclass__): it lives in UperNet's config.
    model_type = "vit_mae_dbp_backbone"

    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    add_fpn: bool = True
    drop_path_rate: float = 0.0

    def __post_init__(self, **kwargs):
        self.mask_ratio = 0.0
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        out_indices, out_features = kwargs.pop("out_indices", None), kwargs.pop("out_features", None)
        if out_indices is None and out_features is None and self._out_indices is None and self._out_features is None:
            out_indices = default_out_indices(self.num_hidden_layers) if self.add_fpn else [self.num_hidden_layers]
        self.set_output_features_output_indices(
            out_indices=out_indices if out_indices is not None else self._out_indices,
            out_features=out_features if out_features is not None else self._out_features,
        )
        if self.add_fpn and len(self._out_indices) != 4:
            raise ValueError(f"add_fpn needs exactly 4 out_indices, got {self._out_indices}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {self.drop_path_rate}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_encoder_config(cls, config: ViTMAEConfig, **kwargs) -> ViTMAEDBPBackboneConfig:
        """The backbone of a (DBP-)MAE pre-training config: same encoder; `kwargs` override any field."""
        values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
        if not isinstance(config, ViTMAEDBPConfig):  # a plain ViTMAE: plain encoder unless asked otherwise
            values["decorrelation_layers"] = []
        values.update(kwargs)
        return cls(**values)


class ViTMAEDBPBackbone(BackboneMixin, ViTMAEDBPPreTrainedModel):
    """
    The encoder of a (DBP-)MAE model as a backbone: returns `feature_maps` of shape `(batch, hidden_size, h, w)` for
    each output stage (rescaled by x4, x2, x1, x0.5 with `add_fpn`), for inputs of any size. The encoder runs
    without masking and keeps the token order. With `decorrelation_layers` set, its R keep training (call
    `decorrelation_step()` after each optimizer step, as [`DBPTrainer`] does).

    Built from a [`ViTMAEDBPBackboneConfig`]; a [`~transformers.ViTMAEConfig`] or [`ViTMAEDBPConfig`] (e.g. through
    `AutoBackbone.from_pretrained("facebook/vit-mae-base")`) is converted, with the default outputs.
    """

    config_class = ViTMAEDBPBackboneConfig

    def __init__(self, config: ViTMAEDBPBackboneConfig | ViTMAEConfig):
        if not isinstance(config, ViTMAEDBPBackboneConfig):
            config = ViTMAEDBPBackboneConfig.from_encoder_config(config)
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.vit = ViTMAEDBPModel(config)
        self.fpn = BeitFPNNeck(config) if config.add_fpn else nn.Identity()
        # Stochastic depth, BEiT's linear schedule over the blocks. ViTMAE's block applies its `dropout` to each
        # branch (attention, MLP) just before adding it to the residual, which is where drop path acts; so each
        # block's dropout is followed by transformers' BEiT drop path, drawn anew for each branch. No weights: the
        # checkpoints are the same with or without it.
        if config.drop_path_rate > 0:
            last = max(1, config.num_hidden_layers - 1)
            for i, layer in enumerate(self.vit.layers):
                layer.dropout = nn.Sequential(layer.dropout, BeitDropPath(config.drop_path_rate * i / last))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        backbone_fields = {k: kwargs.pop(k) for k in ("out_indices", "out_features", "add_fpn") if k in kwargs}
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        if not isinstance(config, ViTMAEDBPBackboneConfig):
            config = ViTMAEDBPBackboneConfig.from_encoder_config(config, **backbone_fields)
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BackboneOutput:
        batch_size, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        grid_height, grid_width = height // patch, width // patch
        # ViTMAE always shuffles tokens by argsort(noise); increasing noise keeps them in order, and mask_ratio 0
        # keeps them all.
        noise = torch.arange(grid_height * grid_width, device=pixel_values.device, dtype=torch.float32)
        kwargs["output_hidden_states"] = True
        outputs = self.vit(pixel_values, noise=noise.expand(batch_size, -1), interpolate_pos_encoding=True, **kwargs)
        feature_maps = tuple(
            hidden[:, 1:, :].transpose(1, 2).reshape(batch_size, -1, grid_height, grid_width)
            for stage, hidden in zip(self.stage_names, outputs.hidden_states, strict=True)
            if stage in self.out_features
        )
        return BackboneOutput(
            feature_maps=self.fpn(feature_maps), hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ViTMAEBackboneFromPreTraining(ViTMAEDBPBackbone):
    """[`ViTMAEDBPBackbone`] as `AutoBackbone` builds it from a plain ViTMAE pre-training config."""

    config_class = ViTMAEConfig


class ViTMAEDBPBackboneFromPreTraining(ViTMAEDBPBackbone):
    """[`ViTMAEDBPBackbone`] as `AutoBackbone` builds it from a DBP-MAE pre-training config."""

    config_class = ViTMAEDBPConfig


def _missing_encoder_keys(loading_info: dict) -> list[str]:
    return [k for k in loading_info.get("missing_keys", []) if k.startswith("vit.") and "_decorrelation." not in k]


def upernet_from_pretraining_checkpoint(
    checkpoint: str,
    id2label: dict[int, str],
    keep_decorrelation: bool = False,
    out_indices: list[int] | None = None,
    drop_path_rate: float | None = None,
    config_name: str | None = None,
    load_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    config: PreTrainedConfig | None = None,
    **upernet_kwargs,
) -> tuple[UperNetForSemanticSegmentation, str]:
    """UperNet around the encoder of a pre-training checkpoint (or a saved UperNet of this project, continued).

    UperNet builds its backbone from config with random weights; this builds it to fit the checkpoint's encoder and
    copies the weights in. A DBP checkpoint has its R folded into the weights (a plain ViT encoder) unless
    `keep_decorrelation`, which keeps R and the DBP settings so that DBP continues during fine-tuning.

    Args:
        checkpoint: a `vit_mae` or `vit_mae_dbp` pre-training checkpoint, or an `upernet` one with this backbone.
        id2label: the segmentation classes.
        keep_decorrelation: keep R (and go on decorrelating) rather than fold it into W.
        out_indices: the encoder blocks that feed UperNet (default: see `default_out_indices`).
        drop_path_rate: the encoder's stochastic depth in fine-tuning (see `ViTMAEDBPBackboneConfig`); `None` keeps
            a continued UperNet's own and gives 0 for a new one.
        config_name: read the configuration from here rather than from `checkpoint` (the weights still come from
            `checkpoint`), as transformers' example scripts' `--config_name`.
        load_kwargs: passed to every `from_pretrained` (`cache_dir`, `revision`, `token`).
        trust_remote_code: passed to `AutoConfig.from_pretrained`, for a checkpoint whose config is its own code.
        config: the configuration of `config_name or checkpoint`, where the caller has loaded it already (read
            here otherwise).
        upernet_kwargs: other `UperNetConfig` fields.

    Returns:
        The model and a one-paragraph report of what was loaded. Raises `ValueError` rather than start from random
        weights when the checkpoint is of another kind or lacks encoder weights.
    """
    load_kwargs = dict(load_kwargs or {})
    if config is None:
        config = AutoConfig.from_pretrained(
            config_name or checkpoint, trust_remote_code=trust_remote_code, **load_kwargs
        )
    if config.model_type == UperNetConfig.model_type:
        if not isinstance(config.backbone_config, ViTMAEDBPBackboneConfig):
            raise ValueError(
                f"{checkpoint} is an UperNet with a {config.backbone_config.model_type!r} backbone, not this project's"
            )
        if drop_path_rate is not None:
            config.backbone_config.drop_path_rate = drop_path_rate
        model, info = UperNetForSemanticSegmentation.from_pretrained(
            checkpoint, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **load_kwargs
        )
        _refuse_mismatched(checkpoint, info)
        if info["missing_keys"]:
            raise ValueError(f"{checkpoint} lacks weights for {sorted(info['missing_keys'])[:10]}")
        return model, f"Continued from the UperNet checkpoint {checkpoint} (all weights loaded)."
    if config.model_type not in (ViTMAEConfig.model_type, ViTMAEDBPConfig.model_type):
        raise ValueError(
            f"{checkpoint} holds a {config.model_type!r} model; give a 'vit_mae' or 'vit_mae_dbp' pre-training "
            "checkpoint, or an 'upernet' checkpoint saved by this project."
        )
    pretrained, info = ViTMAEDBPForPreTraining.from_pretrained(
        checkpoint,
        **({"config": ViTMAEDBPConfig.from_pretrained(config_name, **load_kwargs)} if config_name else {}),
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        **load_kwargs,
    )
    _refuse_mismatched(checkpoint, info)
    if missing := _missing_encoder_keys(info):
        raise ValueError(f"{checkpoint} lacks encoder weights {missing[:10]} (and {max(0, len(missing) - 10)} more)")
    kind = "DBP-MAE" if config.model_type == ViTMAEDBPConfig.model_type else "MAE"
    return upernet_around_encoder(
        pretrained,
        id2label,
        keep_decorrelation,
        out_indices,
        source=f"the {kind} encoder of {checkpoint}",
        drop_path_rate=drop_path_rate or 0.0,
        **upernet_kwargs,
    )


def _refuse_mismatched(checkpoint: str, info: dict) -> None:
    """A `ValueError` naming the weights file and the first tensor whose shape is not the model's (as
    `hf_dbp.core.model.from_pretrained_checked`; this module's code travels with checkpoints, so it imports no more)."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda entry: entry[0])
    if mismatched:
        key, found, expected = mismatched[0]
        weights = os.path.join(checkpoint, "model.safetensors")
        raise ValueError(
            f"{weights if os.path.isfile(weights) else checkpoint}: {key} has shape {tuple(found)}, the model its "
            f"config describes needs {tuple(expected)} (the checkpoint does not match its config.json)"
            + (f"; {len(mismatched) - 1} more tensors differ" if len(mismatched) > 1 else "")
        )


def upernet_around_encoder(
    pretrained: ViTMAEDBPForPreTraining,
    id2label: dict[int, str],
    keep_decorrelation: bool = False,
    out_indices: list[int] | None = None,
    source: str = "the given encoder",
    drop_path_rate: float = 0.0,
    **upernet_kwargs,
) -> tuple[UperNetForSemanticSegmentation, str]:
    """UperNet whose backbone holds the encoder of `pretrained` (see `upernet_from_pretraining_checkpoint`)."""
    decorrelated = pretrained.config.decorrelation_layers if keep_decorrelation else []
    encoder = pretrained.vit if keep_decorrelation else pretrained.vit.merge_decorrelation()
    settings = {"decorrelation_layers": decorrelated, "drop_path_rate": drop_path_rate}
    if out_indices:
        settings["out_indices"] = out_indices
    backbone_config = ViTMAEDBPBackboneConfig.from_encoder_config(pretrained.config, **settings)
    upernet_config = UperNetConfig(
        backbone_config=backbone_config,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        **upernet_kwargs,
    )
    model = UperNetForSemanticSegmentation(upernet_config)
    try:
        model.backbone.vit.load_state_dict(encoder.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source} does not fit the backbone: {error}") from error
    if keep_decorrelation:
        how = f"R kept on {len(model.backbone.decorrelation_modules())} layer groups, DBP continues"
    elif any(not d.is_identity() for d in pretrained.decorrelation_modules()):
        how = "R folded into the weights"
    else:
        how = "plain ViT encoder"
    report = (
        f"Loaded {source} into UperNet's backbone ({len(encoder.state_dict())} tensors, "
        f"{pretrained.config.num_hidden_layers} blocks, width {pretrained.config.hidden_size}, {how}); features from "
        f"blocks {backbone_config.out_indices}; the neck and the UperNet heads start from random weights."
    )
    return model, report


def layer_decay_parameter_groups(
    model: UperNetForSemanticSegmentation, learning_rate: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT/MAE fine-tuning).

    The patch embedding gets `lr * decay^(L+1)`, block `i` (1-based) `lr * decay^(L+1-i)`, and the neck and heads
    the full `lr`. Biases, norms, position embeddings and the class token carry no weight decay; R is left out. transformers has
    no layer decay built in, and its schedulers scale each group's own lr, so the ratios hold through the schedule.
    """
    num_layers = model.config.backbone_config.num_hidden_layers
    matrices = {id(R) for R in decorrelation_matrices(model)}  # updated by the decorrelation step, never by AdamW
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in matrices:
            continue
        if name.startswith("backbone.vit.embeddings."):
            layer = 0
        elif name.startswith("backbone.vit.layers."):
            layer = int(name.split(".")[3]) + 1
        else:
            layer = num_layers + 1
        no_decay = param.ndim == 1 or name.endswith(("position_embeddings", "cls_token"))
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": learning_rate * layer_decay ** (num_layers + 1 - layer),
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]
