"""What a model card says about each kind of model: tags, metrics, a description and the code that loads it.

`hf_dbp.training.model_card` builds every card the same way from one [`CardProfile`]: the profiles of hf-dbp's own
models are here (the masked autoencoder and the UperNet around its encoder), and every other model gets the generic
profile of the Auto class that loads it, from transformers' own name lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

LANGUAGE_MODELLING_METRICS = {"eval_loss": "cross-entropy loss (validation)", "perplexity": "perplexity (validation)"}
PRETRAINING_METRICS = {"eval_loss": "MAE reconstruction loss (validation)"}
SEGMENTATION_METRICS = {
    "eval_mean_iou": "mean IoU",
    "eval_mean_accuracy": "mean accuracy",
    "eval_overall_accuracy": "overall accuracy",
}
# The Auto class that loads an architecture, from transformers' own name lists, and the pipeline task it serves.
_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "text-generation"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "fill-mask"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "AutoModelForCTC", "automatic-speech-recognition"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq", "automatic-speech-recognition"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification", "image-classification"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "text-classification"),
    ("MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", "AutoModelForSemanticSegmentation", "image-segmentation"),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining", None),
)


def auto_class(config) -> tuple[str, str | None]:
    """The name of the Auto class that loads `config`'s architecture, and the pipeline task it serves (or None)."""
    from transformers.models.auto import modeling_auto

    architecture = (getattr(config, "architectures", None) or [""])[0]
    for names, auto, task in _AUTO_CLASSES:
        classes = getattr(modeling_auto, names, {}).get(config.model_type)
        if architecture and architecture in ((classes,) if isinstance(classes, str) else tuple(classes or ())):
            return auto, task
    return "AutoModel", None


@dataclass
class CardProfile:
    """What a card says about one kind of model.

    Args:
        tags: the Hub tags of the kind (after `hf-dbp`; DBP's own are added where they apply).
        metrics: `{key in all_results.json: label}`, shown and put into the model index.
        task_type, task_name, pipeline_tag: the model index's task and the card's pipeline tag.
        fine_tuning: whether the kind is always a fine-tune (its emissions are `fine-tuning`).
        describe: `(config, method, merged_from) -> str`, the card's first paragraph.
        loading: `(config, load_path, decorrelated) -> lines`, the "How to load" section.
    """

    tags: list[str]
    metrics: dict[str, str]
    describe: Callable
    loading: Callable
    task_type: str | None = None
    task_name: str | None = None
    pipeline_tag: str | None = None
    fine_tuning: bool = False
    extra: dict = field(default_factory=dict)


def _generic(config) -> CardProfile:
    auto, task = auto_class(config)
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]

    def describe(config, method, merged_from):
        return (
            f"A {config.model_type} model (`{architecture}`) trained with {method} using "
            "[hf-dbp](https://github.com/hf-dbp/hf-dbp)."
        )

    def loading(config, load_path, decorrelated):
        lines = ["```python", f"from transformers import {auto}", ""]
        if not decorrelated:
            return lines + [f'model = {auto}.from_pretrained("{load_path}")', "```"]
        return lines + [
            "import hf_dbp  # pip install hf-dbp",
            "",
            f'model = hf_dbp.load_decorrelated({auto}, "{load_path}")  # every R restored',
            "plain = hf_dbp.merge_decorrelation(model)  # R folded into the weights: a plain model",
            "```",
            "",
            f'`{auto}.from_pretrained("{load_path}")` without hf-dbp loads the weights without R (a different '
            "model); merge first to publish a checkpoint for plain transformers.",
        ]

    return CardProfile(
        [config.model_type] + ([task] if task else []),
        LANGUAGE_MODELLING_METRICS,
        describe,
        loading,
        task_type=task,
        pipeline_tag=task,
    )


def _encoder_size(encoder) -> str:
    return (
        f"{encoder.num_hidden_layers} blocks, width {encoder.hidden_size}, {encoder.image_size} px pre-training "
        f"images, patch {encoder.patch_size}"
    )


def _masked_autoencoder(config) -> CardProfile:
    def describe(config, method, merged_from):
        if merged_from:
            return (
                f"A ViT masked autoencoder ({_encoder_size(config)}) pre-trained with decorrelated backpropagation "
                f"(DBP), with every decorrelation matrix R folded into its weights (`hf-dbp merge {merged_from}`): a "
                "plain ViTMAE checkpoint with the same outputs, no extra cost, and no dependency on hf-dbp."
            )
        return (
            f"A ViT masked autoencoder ({_encoder_size(config)}, mask ratio {config.mask_ratio}) pre-trained with "
            f"{method} using [hf-dbp](https://github.com/hf-dbp/hf-dbp), after *Decorrelation Speeds Up Vision "
            "Transformers* (arXiv 2510.14657)."
        )

    def loading(config, load_path, decorrelated):
        if decorrelated:
            return [
                "```python",
                "import hf_dbp  # pip install hf-dbp: registers vit_mae_dbp",
                "from transformers import AutoModelForPreTraining",
                "",
                f'model = AutoModelForPreTraining.from_pretrained("{load_path}")',
                "```",
                "",
                "Without hf-dbp: the checkpoint carries its code, so `AutoModelForPreTraining.from_pretrained("
                f'"{load_path}", trust_remote_code=True)` loads it with plain transformers (read the code first: '
                "`modeling_vit_mae_dbp.py`, `decorrelation.py`). Or fold R into the weights once "
                "(`hf-dbp merge CHECKPOINT OUT`) for a plain ViTMAE checkpoint (`ViTMAEForPreTraining`, or "
                "`ViTModel` for the encoder) with no custom code at all.",
            ]
        return [
            "```python",
            "from transformers import ViTMAEForPreTraining, ViTModel",
            "",
            f'model = ViTMAEForPreTraining.from_pretrained("{load_path}")',
            f'encoder = ViTModel.from_pretrained("{load_path}", add_pooling_layer=False)  # the encoder alone',
            "```",
        ]

    return CardProfile(
        ["mae", "vision-transformer", "image-pretraining"],
        PRETRAINING_METRICS,
        describe,
        loading,
        task_type="masked-image-modeling",
        task_name="MAE pre-training",
    )


def _segmentation(config) -> CardProfile:
    def describe(config, method, merged_from):
        return (
            f"UperNet for semantic segmentation ({config.num_labels} classes) on a ViT encoder "
            f"({_encoder_size(config.backbone_config)}) pre-trained as a masked autoencoder, fine-tuned with "
            "[hf-dbp](https://github.com/hf-dbp/hf-dbp)."
        )

    def loading(config, load_path, decorrelated):
        return [
            "```python",
            "import hf_dbp  # registers the backbone",
            "from transformers import AutoModelForSemanticSegmentation",
            "",
            f'model = AutoModelForSemanticSegmentation.from_pretrained("{load_path}")',
            "```",
        ]

    return CardProfile(
        ["mae", "vision-transformer", "semantic-segmentation", "upernet"],
        SEGMENTATION_METRICS,
        describe,
        loading,
        task_type="image-segmentation",
        task_name="Semantic segmentation",
        fine_tuning=True,
    )


def card_profile(config) -> CardProfile:
    """The profile of `config`'s kind of model: hf-dbp's masked autoencoders (plain or DBP) and UperNet around their
    encoder have their own, every other model the generic one of its Auto class."""
    if config.model_type in ("vit_mae", "vit_mae_dbp"):
        return _masked_autoencoder(config)
    backbone = getattr(config, "backbone_config", None)
    if config.model_type == "upernet" and getattr(backbone, "model_type", None) == "vit_mae_dbp_backbone":
        return _segmentation(config)
    return _generic(config)


__all__ = ["CardProfile", "auto_class", "card_profile"]
