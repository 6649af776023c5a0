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


@pytest.mark.parametrize("name, bp", [("paper_dbp_vit_b16_imagenet10.yaml", False), ("paper_bp_vit_b16_imagenet10.yaml", True)])
def test_paper_config_parses(tmp_path, monkeypatch, name, bp):
    values = yaml.safe_load((ROOT / "examples" / "configs" / name).read_text())
    assert values.pop("bf16") is True  # GPU-only; TrainingArguments refuses bf16 on a CPU-only machine
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    monkeypatch.setattr(sys, "argv", ["run_mae_dbp.py", str(path)])
    model_args, data_args, dbp_args, training_args = load_script(monkeypatch).parse_args()
    assert dbp_args.bp_baseline is bp
    assert model_args.config_name == "facebook/vit-mae-base" and model_args.mask_ratio == 0.75 and model_args.norm_pix_loss
    assert data_args.max_train_samples == 128116  # 10% of ImageNet-1K's training images
    assert (training_args.adam_beta1, training_args.adam_beta2, training_args.weight_decay) == (0.9, 0.95, 0.05)
    assert training_args.lr_scheduler_type.value == "cosine" and 0 < training_args.warmup_steps < 1
    assert dbp_args.decorrelation_layers == ["patch_embeddings", "qkv", "o_proj", "fc1", "fc2"]
