"""R is trained by the decorrelation rule only: never a gradient, never in an optimizer, on every path a model is built.

transformers' loader (5.24) assigns every loaded tensor as a new `nn.Parameter` whose `requires_grad` follows its dtype,
so before this was fixed every R came back trainable after `from_pretrained`, and an optimizer over the trainable
parameters moved it. Each load path below is checked the same way: the flag, Trainer's and layer decay's optimizer
groups, the gradient after a backward (also after the user turned every flag on), an optimizer step and a decorrelation
step with lr 0, and R compared exactly with the checkpoint's, also after another save and load.
"""

from collections.abc import Callable

import pytest
import torch
from conftest import TINY_ENCODER, offline_env, randomise_R
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
    UperNetForSemanticSegmentation,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

import hf_dbp
from hf_dbp import (
    DBPTrainer,
    ViTMAEDBPBackbone,
    ViTMAEDBPConfig,
    ViTMAEDBPForPreTraining,
    ViTMAEDBPModel,
    decorrelation_step,
    layer_decay_parameter_groups,
    upernet_from_pretraining_checkpoint,
)
from hf_dbp.core.inject import decorrelation_matrices
from hf_dbp.training.training_args import DBPTrainingArguments

LABELS = {i: f"class{i}" for i in range(3)}
UPERNET = dict(hidden_size=16, auxiliary_channels=8)


def r_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every R by its name without the model's prefixes (`vit.`, `backbone.vit.`): the same key on every path."""
    return {
        name.split("vit.", 1)[-1]: p.detach().clone()
        for name, p in model.named_parameters()
        if name.endswith("_decorrelation.R")
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """A DBP-MAE checkpoint whose R are far from the identity, plain ViTMAE ones (4.x and 5.x key layouts), and an
    UperNet that kept the DBP encoder's R."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    dbp = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**TINY_ENCODER, decorrelation_lr=0.0))
    randomise_R(dbp)
    dbp.save_pretrained(root / "dbp")
    plain = ViTMAEForPreTraining(ViTMAEConfig(**TINY_ENCODER))
    plain.save_pretrained(root / "plain_4x")  # save_pretrained writes the 4.x key layout
    (root / "plain_5x").mkdir()
    save_file(plain.state_dict(), root / "plain_5x" / "model.safetensors", metadata={"format": "pt"})
    (root / "plain_5x" / "config.json").write_text((root / "plain_4x" / "config.json").read_text())
    upernet, _ = upernet_from_pretraining_checkpoint(str(root / "dbp"), LABELS, keep_decorrelation=True, **UPERNET)
    upernet.save_pretrained(root / "upernet")
    return {
        "root": root,
        "dbp_R": r_by_name(dbp),
        "plain_R": {k: torch.eye(v.shape[0]) for k, v in r_by_name(dbp).items()},
    }


def _pretraining_loss(model, pixels):
    return model(pixels).loss


def _encoder_loss(model, pixels):
    return model(pixels).last_hidden_state.square().mean()


def _backbone_loss(model, pixels):
    return sum(f.square().mean() for f in model(pixels).feature_maps)


def _segmentation_loss(model, pixels):
    return model(pixels, labels=torch.randint(0, len(LABELS), (pixels.shape[0], *pixels.shape[2:]))).loss


# name: (how to build the model from the checkpoint folder, its loss, the R it must hold: "dbp" or "plain")
LOAD_PATHS: dict[str, tuple[Callable, Callable, str]] = {
    "fresh model": (lambda root: ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**TINY_ENCODER)), _pretraining_loss, "plain"),
    "plain ViTMAE, 4.x keys": (
        lambda root: ViTMAEDBPForPreTraining.from_pretrained(root / "plain_4x"),
        _pretraining_loss,
        "plain",
    ),
    "plain ViTMAE, 5.x keys": (
        lambda root: ViTMAEDBPForPreTraining.from_pretrained(root / "plain_5x"),
        _pretraining_loss,
        "plain",
    ),
    "DBP": (lambda root: ViTMAEDBPForPreTraining.from_pretrained(root / "dbp"), _pretraining_loss, "dbp"),
    "DBP, float16": (
        lambda root: ViTMAEDBPForPreTraining.from_pretrained(root / "dbp", dtype=torch.float16),
        _pretraining_loss,
        "dbp",
    ),
    "DBP, bfloat16": (
        lambda root: ViTMAEDBPForPreTraining.from_pretrained(root / "dbp", dtype=torch.bfloat16),
        _pretraining_loss,
        "dbp",
    ),
    "DBP, device_map": (
        lambda root: ViTMAEDBPForPreTraining.from_pretrained(root / "dbp", device_map="cpu"),
        _pretraining_loss,
        "dbp",
    ),
    "plain ViTMAE, device_map": (
        lambda root: ViTMAEDBPForPreTraining.from_pretrained(root / "plain_4x", device_map="cpu"),
        _pretraining_loss,
        "plain",
    ),
    "AutoModelForPreTraining": (
        lambda root: AutoModelForPreTraining.from_pretrained(root / "dbp"),
        _pretraining_loss,
        "dbp",
    ),
    "AutoModel (head to base)": (lambda root: AutoModel.from_pretrained(root / "dbp"), _encoder_loss, "dbp"),
    "ViTMAEDBPModel (head to base)": (lambda root: ViTMAEDBPModel.from_pretrained(root / "dbp"), _encoder_loss, "dbp"),
    "ViTMAEDBPModel from plain": (
        lambda root: ViTMAEDBPModel.from_pretrained(root / "plain_4x"),
        _encoder_loss,
        "plain",
    ),
    # What AutoBackbone.from_pretrained calls. AutoBackbone itself asks the Hub about every name first (transformers
    # 5.24), so it cannot open a local folder.
    "backbone from a DBP-MAE checkpoint": (
        lambda root: ViTMAEDBPBackbone.from_pretrained(root / "dbp"),
        _backbone_loss,
        "dbp",
    ),
    "UperNet around the encoder, R kept": (
        lambda root: upernet_from_pretraining_checkpoint(
            str(root / "dbp"), LABELS, keep_decorrelation=True, **UPERNET
        )[0],
        _segmentation_loss,
        "dbp",
    ),
    "saved UperNet": (
        lambda root: UperNetForSemanticSegmentation.from_pretrained(root / "upernet"),
        _segmentation_loss,
        "dbp",
    ),
    "saved UperNet, AutoModelForSemanticSegmentation": (
        lambda root: AutoModelForSemanticSegmentation.from_pretrained(root / "upernet", dtype=torch.bfloat16),
        _segmentation_loss,
        "dbp",
    ),
}


@pytest.fixture(params=list(LOAD_PATHS), scope="module")
def loaded(request, checkpoints):
    build, loss, expected = LOAD_PATHS[request.param]
    return build(checkpoints["root"]), loss, checkpoints[f"{expected}_R"]


def test_every_R_is_frozen_float32_and_exactly_the_checkpoints(loaded):
    model, _, expected = loaded
    got = r_by_name(model)
    assert sorted(got) == sorted(expected)
    for name, R in got.items():
        assert R.dtype == torch.float32, name
        assert torch.equal(R, expected[name]), name
    assert not any(R.requires_grad for R in decorrelation_matrices(model))


def test_trainer_and_layer_decay_leave_R_out_of_the_optimizer(loaded, tmp_path):
    model, _, _ = loaded
    model.requires_grad_(True)  # what a user unfreezing everything does; the trainer must still leave R out
    args = DBPTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, track_emissions=False)
    optimizer = DBPTrainer(model=model, args=args).create_optimizer()
    matrices = {id(R) for R in decorrelation_matrices(model)}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert held and not matrices & {id(p) for p in held}
    if isinstance(model, UperNetForSemanticSegmentation):
        groups = layer_decay_parameter_groups(model, 1e-4, 0.05, 0.65)
        assert not matrices & {id(p) for group in groups for p in group["params"]}


def test_no_gradient_reaches_R_and_steps_with_lr_zero_leave_it_alone(loaded):
    """Even with every flag turned on and a hand-made AdamW over all of `model.parameters()` (R included)."""
    model, loss_of, _ = loaded
    model.train().requires_grad_(True)
    before = r_by_name(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(next(model.parameters()).dtype)
    for step in range(2):
        loss_of(model, pixels).backward()
        assert all(R.grad is None for R in decorrelation_matrices(model))
        if step == 0:  # the weights did get gradients (ViTMAE's cls_token gets a NaN one in float16 on CPU, as plain)
            assert any(p.grad is not None and torch.nan_to_num(p.grad).abs().sum() > 0 for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        decorrelation_step([m for m in model.modules() if isinstance(m, hf_dbp.Decorrelation)], lr=0.0, kappa=0.01)
    after = r_by_name(model)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_R_round_trips_exactly_through_another_save(loaded, tmp_path):
    model, _, expected = loaded
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    got = r_by_name(again)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not any(R.requires_grad for R in decorrelation_matrices(again))


def test_remote_code_load_keeps_R_frozen(checkpoints, tmp_path):
    """`trust_remote_code=True` in a process that never imports hf_dbp: the checkpoint's own copy of the code."""
    import subprocess
    import sys

    code = f"""
import torch
from transformers import AutoModelForPreTraining
model = AutoModelForPreTraining.from_pretrained({str(checkpoints["root"] / "dbp")!r}, trust_remote_code=True)
assert "hf_dbp" not in type(model).__module__, type(model).__module__
matrices = [p for n, p in model.named_parameters() if n.endswith("_decorrelation.R")]
assert len(matrices) == 17 and not any(R.requires_grad for R in matrices)
model.train().requires_grad_(True)
model(torch.randn(2, 3, 16, 16)).loss.backward()
assert all(R.grad is None for R in matrices)
print("ok")
"""
    env = offline_env(tmp_path / "hf_home")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
