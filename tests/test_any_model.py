"""DBP for any transformers model (`hf_dbp.decorrelate`): every supported family, from tiny configs.

For each family: R = I gives the plain model's outputs; after real steps with R != I, merging gives the same outputs
as the decorrelated model and as its merged checkpoint reloaded by plain transformers; a save/load round trip gives
every R back exactly (float32 and out of the gradient, also when the model loads in bfloat16); and a short DBPTrainer
run lowers the decorrelation loss, with the plain model's BP run measuring the same figure.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from datasets import Dataset
from transformers import TrainingArguments

import hf_dbp
from hf_dbp import DBPTrainer, DecorrelationConfig
from hf_dbp.core.layers import DecorrelatedConv1D, DecorrelatedConv2d, DecorrelatedLinear
from hf_dbp.core.model import decorrelation_modules
from hf_dbp.core.plan import example_inputs, plan_decorrelation
from hf_dbp.models.vit_mae_dbp.modeling_vit_mae_dbp import vit_mae_decorrelation_groups

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
AUDIO = dict(
    conv_dim=(16, 16),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    vocab_size=12,
)
FAMILIES = {
    # name: (config, model class, what its shared R are called in layer 0)
    "vit": (lambda: T.ViTConfig(**SMALL, image_size=16, patch_size=4, num_labels=3), T.ViTForImageClassification),
    "vit_mae": (
        lambda: T.ViTMAEConfig(
            **SMALL,
            image_size=16,
            patch_size=4,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
        ),
        T.ViTMAEForPreTraining,
    ),
    "bert": (lambda: T.BertConfig(**SMALL, vocab_size=40), T.BertForMaskedLM),
    "roberta": (lambda: T.RobertaConfig(**SMALL, vocab_size=40, pad_token_id=1), T.RobertaForMaskedLM),
    "gpt2": (
        lambda: T.GPT2Config(
            vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        ),
        T.GPT2LMHeadModel,
    ),
    "llama": (lambda: T.LlamaConfig(**SMALL, vocab_size=40, max_position_embeddings=32), T.LlamaForCausalLM),
    "qwen2": (
        lambda: T.Qwen2Config(**SMALL, num_key_value_heads=1, vocab_size=40, max_position_embeddings=32),
        T.Qwen2ForCausalLM,
    ),
    "mistral": (
        lambda: T.MistralConfig(**SMALL, num_key_value_heads=1, vocab_size=40, max_position_embeddings=32),
        T.MistralForCausalLM,
    ),
    "wav2vec2": (lambda: T.Wav2Vec2Config(**SMALL, **AUDIO), T.Wav2Vec2ForCTC),
    "hubert": (lambda: T.HubertConfig(**SMALL, **AUDIO), T.HubertForCTC),
    "whisper": (
        lambda: T.WhisperConfig(
            vocab_size=40,
            d_model=32,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        ),
        T.WhisperForConditionalGeneration,
    ),
}
# The R that the architecture's first block shares between layers reading one input: found by tracing, not listed.
SHARED = {
    "vit": {"vit.layers.0.attention.qkv": 3},
    "vit_mae": {"vit.layers.0.attention.qkv": 3},
    "bert": {"bert.encoder.layer.0.attention.self.query_key_value": 3},
    "roberta": {"roberta.encoder.layer.0.attention.self.query_key_value": 3},
    "gpt2": {},  # c_attn is one fused projection: one layer, one R
    "llama": {"model.layers.0.self_attn.qkv": 3, "model.layers.0.mlp.gate_up": 2},
    "qwen2": {"model.layers.0.self_attn.qkv": 3, "model.layers.0.mlp.gate_up": 2},
    "mistral": {"model.layers.0.self_attn.qkv": 3, "model.layers.0.mlp.gate_up": 2},
    "wav2vec2": {"wav2vec2.encoder.layers.0.attention.kvq": 3},
    "hubert": {"hubert.encoder.layers.0.attention.kvq": 3},
    "whisper": {"model.encoder.layers.0.self_attn.kvq": 3},
}


def build(family: str, seed: int = 0):
    config_factory, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config_factory()).eval()


def inputs_for(model, batch: int = 2, seed: int = 0) -> dict:
    """A fixed input batch for `model` (with labels where its loss needs them)."""
    generator = torch.Generator().manual_seed(seed)
    config, name = model.config, model.main_input_name
    if name == "input_ids":
        ids = torch.randint(3, config.vocab_size, (batch, 12), generator=generator)
        return {"input_ids": ids, "labels": ids.clone()}
    if name == "pixel_values":
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
        out = {"pixel_values": pixels}
        if isinstance(model, T.ViTMAEForPreTraining):
            out["noise"] = torch.rand(batch, (config.image_size // config.patch_size) ** 2, generator=generator)
        else:
            out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=generator)
        return out
    if name == "input_values":
        return {
            "input_values": torch.randn(batch, 2000, generator=generator),
            "labels": torch.randint(3, config.vocab_size, (batch, 4), generator=generator),
        }
    features = torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
    return {"input_features": features, "labels": torch.randint(3, config.vocab_size, (batch, 5), generator=generator)}


def first_output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits


def train_a_little(model, steps: int = 3, lr: float = 1e-2) -> None:
    """Real optimizer and decorrelation steps, so that every R moves away from the identity."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(steps):
        model(**inputs_for(model, seed=step + 1)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        hf_dbp.decorrelation_step(model, lr=lr)
    model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decorrelated_model_round_trips(family, tmp_path):
    model = build(family)
    inputs = inputs_for(model)
    plain_out = first_output(model, inputs)
    returned = hf_dbp.decorrelate(model, DecorrelationConfig(sample_fraction=0.5))
    assert returned is model and isinstance(model, FAMILIES[family][1])  # its own class, in place
    torch.testing.assert_close(first_output(model, inputs), plain_out, rtol=1e-5, atol=1e-5)  # R = I

    groups = model.config.decorrelation["groups"]
    for name, size in SHARED[family].items():
        assert len(groups[name]) == size, groups
    assert all(not any("decoder" in p for p in paths) for paths in groups.values())  # decoders are left alone
    assert not any(p.endswith(("lm_head", "classifier", "proj_out")) for paths in groups.values() for p in paths)

    train_a_little(model)
    Rs = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_decorrelation.R")}
    assert Rs and all(not torch.equal(R, torch.eye(R.shape[0])) for R in Rs.values())
    out = first_output(model, inputs)

    model.save_pretrained(tmp_path / "dbp")
    assert json.loads((tmp_path / "dbp" / "config.json").read_text())["decorrelation"]["groups"] == groups
    loaded = hf_dbp.load_decorrelated(_auto_class(model), tmp_path / "dbp").eval()
    assert type(loaded) is type(model)
    for name, R in loaded.named_parameters():
        if name.endswith("_decorrelation.R"):
            assert torch.equal(R, Rs[name]) and not R.requires_grad
    assert {n for n, _ in loaded.named_parameters() if n.endswith(".R")} == set(Rs)
    torch.testing.assert_close(first_output(loaded, inputs), out, rtol=0, atol=0)

    merged = hf_dbp.merge_decorrelation(loaded)
    assert type(merged) is type(model) and not decorrelation_modules(merged) and decorrelation_modules(loaded)
    assert not any(
        isinstance(m, (DecorrelatedLinear, DecorrelatedConv1D, DecorrelatedConv2d)) for m in merged.modules()
    )
    torch.testing.assert_close(first_output(merged, inputs), out, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "plain")
    assert "decorrelation" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    reloaded = type(model).from_pretrained(tmp_path / "plain").eval()  # plain transformers, no hf_dbp involved
    torch.testing.assert_close(first_output(reloaded, inputs), out, rtol=1e-4, atol=1e-4)


def _auto_class(model):
    architecture = type(model).__name__
    for auto in (
        T.AutoModelForCausalLM,
        T.AutoModelForMaskedLM,
        T.AutoModelForImageClassification,
        T.AutoModelForCTC,
        T.AutoModelForSpeechSeq2Seq,
        T.AutoModelForPreTraining,
    ):
        if any(getattr(c, "__name__", None) == architecture for c in auto._model_mapping.values()):
            return auto
    raise AssertionError(architecture)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_half_precision_load_keeps_r_in_float32(family, tmp_path):
    model = hf_dbp.decorrelate(build(family))
    train_a_little(model, steps=1)
    model.save_pretrained(tmp_path)
    loaded = hf_dbp.load_decorrelated(_auto_class(model), tmp_path, dtype=torch.bfloat16)
    Rs = [d.R for d in decorrelation_modules(loaded)]
    assert all(R.dtype == torch.float32 and not R.requires_grad for R in Rs)
    assert next(p for n, p in loaded.named_parameters() if n.endswith("weight")).dtype == torch.bfloat16
    expected = [d.R for d in decorrelation_modules(model)]  # in the same order: the layers' order in the model
    assert all(torch.equal(a, b) for a, b in zip(Rs, expected, strict=True))
    loaded.to(torch.float16)  # a cast of the whole model never rounds R
    assert all(d.R.dtype == torch.float32 for d in decorrelation_modules(loaded))


def test_vit_mae_plan_found_by_tracing_is_the_vit_mae_dbp_plan():
    # The ViTMAEDBP classes and hf_dbp.decorrelate build the same R for the same layers, under the same names.
    model = build("vit_mae")
    traced = plan_decorrelation(model, DecorrelationConfig())
    expected = {f"vit.{k}": [f"vit.{p}" for p in v] for k, v in vit_mae_decorrelation_groups(2).items()}
    assert traced == expected


def test_target_modules_forms_and_errors():
    model = build("llama")
    only_v = plan_decorrelation(model, DecorrelationConfig(target_modules=["v_proj"]))
    assert list(only_v) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    regex = plan_decorrelation(model, DecorrelationConfig(target_modules=r".*layers\.1\.mlp\.(gate|up)_proj"))
    assert regex == {"model.layers.1.mlp.gate_up": ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]}
    every = plan_decorrelation(model, DecorrelationConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    layers = [p for paths in every.values() for p in paths]
    assert "lm_head" not in layers and not any(p.endswith("o_proj") for p in layers) and len(layers) == 12
    whisper = plan_decorrelation(build("whisper"), DecorrelationConfig(target_modules="all-linear"))
    assert all(".decoder." not in p for paths in whisper.values() for p in paths)  # the decoder of enc-dec models
    with pytest.raises(ValueError, match="no layer of LlamaForCausalLM matches"):
        plan_decorrelation(model, DecorrelationConfig(target_modules=["nothing_like_this"]))
    with pytest.raises(ValueError, match=r"'model.embed_tokens' \(Embedding\) cannot be decorrelated"):
        plan_decorrelation(model, DecorrelationConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"\(Conv1d\) cannot be decorrelated"):  # wav2vec2's feature extractor
        plan_decorrelation(build("wav2vec2"), DecorrelationConfig(target_modules=["conv_layers.0.conv"]))
    with pytest.raises(ValueError, match="not patchifying"):
        plan_decorrelation(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)), DecorrelationConfig(target_modules=["0"])
        )
    with pytest.raises(ValueError, match="no default target modules for model type 'distilbert'"):
        hf_dbp.decorrelate(
            T.DistilBertModel(T.DistilBertConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=8, vocab_size=9))
        )
    with pytest.raises(ValueError, match="kappa must be a number in"):
        DecorrelationConfig(kappa=2.0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        DecorrelationConfig(target_modules="q_proj(")
    hf_dbp.decorrelate(model)
    with pytest.raises(ValueError, match="already decorrelated"):
        hf_dbp.decorrelate(model)


def test_loading_a_plain_checkpoint_as_decorrelated_names_the_problem(tmp_path):
    build("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a decorrelated checkpoint.*hf_dbp.decorrelate"):
        hf_dbp.load_decorrelated(T.AutoModelForCausalLM, tmp_path)


def test_example_inputs_run_every_family():
    for family in FAMILIES:
        model = build(family)
        model(**example_inputs(model))


def _token_dataset(model, n: int = 48) -> Dataset:
    # Sequences with structure (a few tokens repeat in patterns), so that the layers' inputs carry correlations.
    generator = torch.Generator().manual_seed(0)
    base = torch.randint(3, model.config.vocab_size, (8, 12), generator=generator)
    ids = base[torch.randint(0, 8, (n,), generator=generator)]
    ids = torch.where(torch.rand(ids.shape, generator=generator) < 0.2, torch.randint_like(ids, 3, 12), ids)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dbp_trainer_trains_a_decorrelated_language_model_and_measures_its_bp_baseline(family, tmp_path):
    args = dict(
        per_device_train_batch_size=8,
        max_steps=24,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=True,
    )
    settings = DecorrelationConfig(lr=3e-2, sample_fraction=1.0)
    dbp = hf_dbp.decorrelate(build(family), settings)
    trainer = DBPTrainer(
        model=dbp, args=TrainingArguments(tmp_path / "dbp", **args), train_dataset=_token_dataset(dbp)
    )
    trainer.train()
    losses = [r["decorrelation_loss"] for r in trainer.state.log_history if "decorrelation_loss" in r]
    assert len(losses) == 24 and losses[-1] < 0.5 * losses[0], losses

    bp = build(family)
    trainer = DBPTrainer(
        model=bp,
        args=TrainingArguments(tmp_path / "bp", **args),
        train_dataset=_token_dataset(bp),
        decorrelation_config=settings,
    )
    trainer.train()
    bp_losses = [r["decorrelation_loss"] for r in trainer.state.log_history if "decorrelation_loss" in r]
    assert not decorrelation_modules(bp) and len(bp_losses) == 24
    assert bp_losses[0] == pytest.approx(losses[0], rel=1e-4)  # the same layers, data and rows at step one
    assert losses[-1] < 0.5 * bp_losses[-1]


def test_planning_leaves_the_random_generators_where_they_were():
    """The tracing forward of the plan draws ViTMAE's random masks; a BP run's measurement is planned before it
    trains, and must not change the masks its training draws (BP and DBP with one seed see the same masks)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    model = ViTMAEForPreTraining(
        ViTMAEConfig(
            image_size=16,
            patch_size=4,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            decoder_hidden_size=8,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=16,
        )
    )
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    plan_decorrelation(model, DecorrelationConfig())
    assert torch.equal(torch.rand(4), expected)
