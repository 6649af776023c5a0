"""The shipped recipe files parse into the paper's setting."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("run_mae_dbp", ROOT / "examples" / "run_mae_dbp.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it is imported
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, bp", [("paper_dbp_vit_b16_imagenet10.yaml", False), ("paper_bp_vit_b16_imagenet10.yaml", True)]
)
def test_paper_config_parses(tmp_path, monkeypatch, name, bp):
    values = yaml.safe_load((ROOT / "examples" / "configs" / name).read_text())
    assert values.pop("bf16") is True  # GPU-only; TrainingArguments refuses bf16 on a CPU-only machine
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    monkeypatch.setattr(sys, "argv", ["run_mae_dbp.py", str(path)])
    model_args, data_args, dbp_args, training_args = load_script(monkeypatch).parse_args()
    assert dbp_args.bp_baseline is bp
    assert (
        model_args.config_name == "facebook/vit-mae-base"
        and model_args.mask_ratio == 0.75
        and model_args.norm_pix_loss
    )
    assert data_args.max_train_samples == 128116  # 10% of ImageNet-1K's training images
    assert (training_args.adam_beta1, training_args.adam_beta2, training_args.weight_decay) == (0.9, 0.95, 0.05)
    assert training_args.lr_scheduler_type.value == "cosine" and 0 < training_args.warmup_steps < 1
    assert dbp_args.decorrelation_layers == ["patch_embeddings", "qkv", "o_proj", "fc1", "fc2"]


def test_segmentation_recipe_config_parses_into_the_mae_beit_ade20k_recipe(tmp_path, monkeypatch):
    """examples/configs/upernet_mae_vit_b16_ade20k_160k.yaml is mmsegmentation's MAE ViT-B/16 UperNet recipe: drop path
    0.1, 768 decode channels, 512 crops, sliding windows of 512 at stride 341, AdamW lr 1e-4 with layer decay 0.65 and
    weight decay 0.05, 1,500 warm-up steps then linear (power 1) decay to 0 over 160k steps, batch 2 x 8 processes."""
    values = yaml.safe_load((ROOT / "examples" / "configs" / "upernet_mae_vit_b16_ade20k_160k.yaml").read_text())
    assert values.pop("bf16") is True  # GPU-only
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    spec = importlib.util.spec_from_file_location("run_segmentation", ROOT / "examples" / "run_segmentation.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["run_segmentation.py", str(path)])
    model_args, data_args, training_args = module.parse_args()
    assert model_args.model_name_or_path == "facebook/vit-mae-base" and model_args.drop_path_rate == 0.1
    assert (model_args.upernet_hidden_size, model_args.auxiliary_channels) == (768, 256)
    assert (data_args.crop_size, data_args.eval_window_size, data_args.eval_window_stride) == (512, 512, 341)
    assert data_args.dataset_name == "scene_parse_150" and data_args.do_reduce_labels
    assert (training_args.learning_rate, training_args.layer_decay, training_args.weight_decay) == (1e-4, 0.65, 0.05)
    assert (training_args.adam_beta1, training_args.adam_beta2) == (0.9, 0.999)
    assert training_args.warmup_steps == 1500 and training_args.max_steps == 160000
    assert training_args.lr_scheduler_type.value == "polynomial"
    assert training_args.lr_scheduler_kwargs == {"power": 1.0, "lr_end": 0.0}
    assert training_args.per_device_train_batch_size * 8 == 16
    # The evaluation transform the run would save: the recipe's test_cfg.
    processor = module.DBPSegmentationImageProcessor(
        size={"shortest_edge": 512, "longest_edge": 2048},
        window_size=data_args.eval_window_size,
        window_stride=data_args.eval_window_stride,
    )
    assert processor.num_inputs(512, 683) == 2  # an ADE20K validation image of 512 x 683: two windows
    assert processor.num_inputs(375, 500) == 2  # rescaled to 512 x 683 first
