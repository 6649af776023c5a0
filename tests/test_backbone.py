"""The (DBP-)MAE encoder as a segmentation backbone, and UperNet built around pre-training checkpoints."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSemanticSegmentation,
    BertConfig,
    BertModel,
    TrainingArguments,
    UperNetForSemanticSegmentation,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from hf_dbp import (
    DBPTrainer,
    ViTMAEDBPBackbone,
    ViTMAEDBPBackboneConfig,
    ViTMAEDBPConfig,
    ViTMAEDBPForPreTraining,
    layer_decay_parameter_groups,
    upernet_from_pretraining_checkpoint,
)
from hf_dbp.models.vit_mae_dbp.modeling_vit_mae_dbp_backbone import default_out_indices

LABELS = {i: f"class{i}" for i in range(5)}
UPERNET = dict(hidden_size=16, auxiliary_channels=8)  # small heads


@pytest.fixture
def encoder_kwargs(tiny_kwargs):
    return {**tiny_kwargs, "num_hidden_layers": 4}


@pytest.fixture
def dbp_checkpoint(tmp_path, encoder_kwargs):
    """A DBP-MAE checkpoint whose R are far from the identity, so folding them matters."""
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**encoder_kwargs))
    with torch.no_grad():
        for d in model.decorrelation_modules():
            d.R.add_(0.2 * torch.randn_like(d.R))
    model.save_pretrained(tmp_path / "dbp")
    return model, tmp_path / "dbp"


def test_default_blocks():
    assert default_out_indices(12) == [4, 6, 8, 12]  # the MAE/BEiT ADE20K recipe for ViT-B
    assert default_out_indices(24) == [8, 12, 16, 24]
    assert default_out_indices(4) == [1, 2, 3, 4] and default_out_indices(5) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="4 distinct blocks"):
        default_out_indices(3)


@pytest.mark.parametrize("height, width", [(16, 16), (32, 32), (32, 48), (24, 40)])
def test_feature_shapes_for_any_input_size(encoder_kwargs, height, width):
    backbone = ViTMAEDBPBackbone(ViTMAEDBPBackboneConfig(**encoder_kwargs)).eval()
    grid = (height // 4, width // 4)
    maps = backbone(torch.randn(2, 3, height, width)).feature_maps
    scales = (4, 2, 1, 0.5)
    assert [tuple(m.shape) for m in maps] == [(2, 24, int(grid[0] * s), int(grid[1] * s)) for s in scales]
    assert backbone.channels == [24] * 4


def test_tokens_keep_their_place_and_nothing_is_masked(encoder_kwargs):
    """The stem feature at grid cell (i, j) is the embedding of patch (i, j): no shuffle, no masking."""
    config = ViTMAEDBPBackboneConfig(**encoder_kwargs, add_fpn=False, out_indices=[0], mask_ratio=0.75)
    assert config.mask_ratio == 0.0
    backbone = ViTMAEDBPBackbone(config).eval()
    pixels = torch.randn(1, 3, 16, 24)
    stem = backbone(pixels).feature_maps[0]
    embeddings = backbone.vit.embeddings
    patches = embeddings.patch_embeddings.projection(pixels)  # (1, 24, 4, 6), in image order
    positions = embeddings.interpolate_pos_encoding(patches.flatten(2).transpose(1, 2), 16, 24)[:, 1:]
    expected = patches + positions.transpose(1, 2).reshape(1, 24, 4, 6)
    torch.testing.assert_close(stem, expected)


def test_encoder_weights_are_loaded_with_R_folded(dbp_checkpoint):
    pretrained, path = dbp_checkpoint
    model, report = upernet_from_pretraining_checkpoint(str(path), LABELS, **UPERNET)
    assert "R folded" in report and "DBP-MAE" in report
    backbone = model.backbone.eval()
    assert backbone.decorrelation_modules() == []  # a plain encoder
    pixels = torch.randn(2, 3, 16, 16)
    pretrained.eval().config.mask_ratio = 0.0
    expected = pretrained.vit(pixels, noise=torch.arange(16.0).expand(2, -1), output_hidden_states=True).hidden_states
    got = backbone(pixels, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_plain_mae_checkpoint_and_backbone_from_pretrained(tmp_path, encoder_kwargs):
    torch.manual_seed(0)
    plain = ViTMAEForPreTraining(ViTMAEConfig(**encoder_kwargs))
    plain.save_pretrained(tmp_path)
    model, report = upernet_from_pretraining_checkpoint(str(tmp_path), LABELS, **UPERNET)
    assert "MAE encoder" in report and "plain ViT encoder" in report
    torch.testing.assert_close(model.backbone.vit.layers[3].mlp.fc2.weight, plain.vit.layers[3].mlp.fc2.weight)
    backbone = ViTMAEDBPBackbone.from_pretrained(tmp_path, out_indices=[1, 2, 3, 4])
    assert type(backbone) is ViTMAEDBPBackbone and backbone.out_indices == [1, 2, 3, 4]
    assert torch.equal(backbone.vit.layers[0].attention.q_proj.weight, plain.vit.layers[0].attention.q_proj.weight)


def test_saved_upernet_loads_with_auto_class_and_continues(tmp_path, dbp_checkpoint):
    _, path = dbp_checkpoint
    model, _ = upernet_from_pretraining_checkpoint(str(path), LABELS, **UPERNET)
    model.save_pretrained(tmp_path / "upernet")
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "upernet")
    assert type(reloaded) is UperNetForSemanticSegmentation and type(reloaded.backbone) is ViTMAEDBPBackbone
    pixels = torch.randn(1, 3, 24, 32)
    torch.testing.assert_close(reloaded.eval()(pixels).logits, model.eval()(pixels).logits)
    continued, report = upernet_from_pretraining_checkpoint(str(tmp_path / "upernet"), LABELS)
    assert report.startswith("Continued")
    torch.testing.assert_close(continued.eval()(pixels).logits, model(pixels).logits)


def test_keeping_R_continues_dbp_during_fine_tuning(tmp_path, dbp_checkpoint):
    pretrained, path = dbp_checkpoint
    model, report = upernet_from_pretraining_checkpoint(str(path), LABELS, keep_decorrelation=True, **UPERNET)
    assert "DBP continues" in report
    qkv = model.backbone.vit.layers[0].attention.qkv_decorrelation
    assert torch.equal(qkv.R, pretrained.vit.layers[0].attention.qkv_decorrelation.R)
    before = qkv.R.clone()
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": torch.randint(0, 5, (16, 16))} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "ft"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DBPTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert not torch.equal(qkv.R, before)
    assert all("decorrelation_loss" in r for r in trainer.state.log_history if "loss" in r)


def test_checkpoints_that_do_not_fit_fail_clearly(tmp_path, dbp_checkpoint):
    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert'"):
        upernet_from_pretraining_checkpoint(str(tmp_path / "bert"), LABELS)
    # A pre-training checkpoint without its encoder weights must not start from random ones.
    _, path = dbp_checkpoint
    state = load_file(path / "model.safetensors")
    save_file(
        {k: v for k, v in state.items() if ".layer.2." not in k}, path / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match="lacks encoder weights"):
        upernet_from_pretraining_checkpoint(str(path), LABELS)


def test_layer_decay(dbp_checkpoint):
    _, path = dbp_checkpoint
    model, _ = upernet_from_pretraining_checkpoint(str(path), LABELS, **UPERNET)
    groups = layer_decay_parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    vit = model.backbone.vit
    assert lr_of[id(vit.embeddings.patch_embeddings.projection.weight)] == pytest.approx(1e-3 * 0.5**5)
    assert lr_of[id(vit.layers[0].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.5**4)
    assert lr_of[id(vit.layers[3].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(model.decode_head.classifier.weight)] == pytest.approx(1e-3)
    assert decay_of[id(vit.layers[0].mlp.fc1.weight)] == 0.05 and decay_of[id(vit.layers[0].mlp.fc1.bias)] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
