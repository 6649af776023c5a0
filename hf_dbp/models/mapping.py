"""Per-architecture defaults: which layers of a transformers model DBP decorrelates (like PEFT's target-module maps).

Keyed by `config.model_type`. Names match as in PEFT: a module whose dotted name equals the entry or ends with
`.<entry>`. Which of the targets share one R is not listed here: `hf_dbp.decorrelate` finds it from the model, by
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

_VIT = ["patch_embeddings.projection", "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
_BERT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_WAV2VEC2 = ["q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"]
_DECODER = r"(.*\.)?decoder(\..*)?"

TARGET_MODULES: dict[str, list[str]] = {
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
}
"""Default target modules per `model_type`."""

EXCLUDE_MODULES: dict[str, str] = {
    "vit_mae": _DECODER,
    "vit_mae_dbp": _DECODER,
    "whisper": _DECODER,
}
"""Default exclusions per `model_type` (a regular expression over the whole dotted name): decoders of encoder-decoder
models."""

__all__ = ["EXCLUDE_MODULES", "TARGET_MODULES"]
