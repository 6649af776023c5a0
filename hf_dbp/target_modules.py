"""Per-architecture defaults: which layers DBP decorrelates (data, like PEFT's target-module mappings).

The lowest layer of hf_dbp: plain data that the core imports (`hf_dbp.core.plan`), so that the core itself names no
architecture. Keyed by architecture: a transformers model's `config.model_type`, or for any other module its
library-qualified class name (`timm.VisionTransformer`, see `hf_dbp.core.plan.architecture_of`). Names match as in
PEFT: a module whose dotted name equals the entry or ends with `.<entry>`; a string is a regular expression over the
whole dotted name. Which targets share one R is not listed here: `hf_dbp.decorrelate` finds it from the model, by
tracing which layers read the same input tensor (q, k and v; gate and up in a gated MLP).

Left alone by default, in every family:

- embeddings (token, position): lookups, not products with an input, so there is no input to decorrelate. The patch
  embedding of a ViT is a product (a patchifying conv) and is decorrelated, as in the paper;
- norms: they have no weight matrix;
- the LM head (output embeddings): often tied to the input embeddings, and its input is the last hidden state that
  the model is trained to shape for it; folding R into a tied matrix would change the embeddings too;
- decoders of encoder-decoder models (ViTMAE's pixel decoder, Whisper's text decoder): the paper decorrelates the
  encoder only and reports that as the stable choice.
"""

from __future__ import annotations

VIT_LAYER_KINDS = ("patch_embeddings", "qkv", "o_proj", "fc1", "fc2")
"""The kinds of layer of a ViT encoder that DBP decorrelates, as the paper names them: the patch embedding conv, the
q/k/v projections (one shared R), the attention output projection, and the two MLP linears."""

LAYER_KINDS: dict[str, dict[str, list[str]]] = {
    "vit": {
        "patch_embeddings": ["patch_embeddings.projection"],
        "qkv": ["q_proj", "k_proj", "v_proj"],
        "o_proj": ["o_proj"],
        "fc1": ["fc1"],
        "fc2": ["fc2"],
    },
    # timm's VisionTransformer, on which the official MAE code builds: q, k and v are one fused linear.
    "timm.VisionTransformer": {
        "patch_embeddings": ["patch_embed.proj"],
        "qkv": ["attn.qkv"],
        "o_proj": ["attn.proj"],
        "fc1": ["mlp.fc1"],
        "fc2": ["mlp.fc2"],
    },
}
"""For each ViT architecture, the target modules of each of `VIT_LAYER_KINDS`."""
LAYER_KINDS["vit_mae"] = LAYER_KINDS["vit_mae_dbp"] = LAYER_KINDS["vit"]

_VIT = [name for names in LAYER_KINDS["vit"].values() for name in names]
_BERT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_WAV2VEC2 = ["q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"]
_DECODER = r"(.*\.)?decoder(\..*)?"

TARGET_MODULES: dict[str, list[str] | str] = {
    "vit": _VIT,
    "vit_mae": _VIT,
    "vit_mae_dbp": _VIT,
    "bert": _BERT,
    "roberta": _BERT,
    # GPT-2's attention projection c_attn is one fused Conv1D for q, k and v: one R, as for three separate layers.
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "wav2vec2": _WAV2VEC2,
    "hubert": _WAV2VEC2,
    "whisper": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "timm.VisionTransformer": [name for names in LAYER_KINDS["timm.VisionTransformer"].values() for name in names],
}
"""Default target modules per architecture."""

EXCLUDE_MODULES: dict[str, str] = {
    "vit_mae": _DECODER,
    "vit_mae_dbp": _DECODER,
    "whisper": _DECODER,
}
"""Default exclusions per architecture (a regular expression over the whole dotted name): decoders of
encoder-decoder models."""


def layer_kind_targets(architecture: str, kinds: list[str] | tuple[str, ...]) -> list[str]:
    """The target modules of the layer `kinds` (out of `VIT_LAYER_KINDS`) in a ViT of `architecture`.

    Raises:
        ValueError: for an architecture without layer kinds, an unknown kind, or a kind named twice.
    """
    if architecture not in LAYER_KINDS:
        raise ValueError(f"layer kinds are defined for {sorted(LAYER_KINDS)}, not for {architecture!r}")
    unknown = [kind for kind in kinds if kind not in VIT_LAYER_KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; choose from {list(VIT_LAYER_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"a kind is named twice: {list(kinds)}")
    return [name for kind in VIT_LAYER_KINDS if kind in kinds for name in LAYER_KINDS[architecture][kind]]


def layer_kinds_of(architecture: str, targets: list[str] | str | None) -> list[str] | None:
    """The layer kinds whose targets `targets` lists exactly (the inverse of `layer_kind_targets`), or None where
    `targets` is not such a list."""
    kinds = LAYER_KINDS.get(architecture)
    if kinds is None or not isinstance(targets, list):
        return None
    chosen = [kind for kind, names in kinds.items() if set(names) <= set(targets)]
    return chosen if layer_kind_targets(architecture, chosen) == targets else None


__all__ = [
    "EXCLUDE_MODULES",
    "LAYER_KINDS",
    "TARGET_MODULES",
    "VIT_LAYER_KINDS",
    "layer_kind_targets",
    "layer_kinds_of",
]
