"""Block-diagonal R (`DecorrelationConfig.block_size`): every layer form, the update, the settings and the model files
against the same computation with the dense block-diagonal matrix, written out independently."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn
from transformers import AutoModelForPreTraining
from transformers.pytorch_utils import Conv1D

import hf_dbp
from hf_dbp import DecorrelationConfig, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.core.decorrelation import Decorrelation, block_width
from hf_dbp.core.inject import DecorrelationMonitor, fold_decorrelation, inject_decorrelation
from hf_dbp.core.model import decorrelation_step, defer_weight_gradients, from_pretrained_checked
from hf_dbp.training.model_card import build_model_card

LR, KAPPA = 0.05, 0.3


def reference_update(R, rows, lr=LR, kappa=KAPPA):
    z = rows @ R.T
    X = z.T @ z / z.shape[0]
    C = X - torch.diag(torch.diagonal(X))
    v = torch.diagonal(X) - 1
    loss = ((1 - kappa) * (C**2).sum() + kappa * (v**2).sum()) / R.shape[0] ** 2
    return R - lr * ((1 - kappa) * C @ R + kappa * torch.diag(v) @ R), loss


def dense(R: torch.Tensor) -> torch.Tensor:
    """The (d, d) matrix of a block-diagonal R stored as its blocks."""
    return torch.block_diag(*R.unbind(0))


class Layers(nn.Module):
    """A linear (8 inputs, 3 outputs: few rows take the explicit form, many the folded one), GPT-2's Conv1D, and a
    patchifying conv (2 channels x 2 x 2 = 8 inputs per patch)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.conv1d = Conv1D(5, 8)
        self.patch = nn.Conv2d(2, 4, kernel_size=2, stride=2)


@pytest.mark.parametrize(
    "dim, block_size, expected",
    [(768, 256, 256), (3072, 256, 256), (96, 64, 48), (48, 32, 24), (7, 3, 1), (10, None, 10), (10, 16, 10)],
)
def test_blocks_are_the_largest_divisor_of_the_width_not_above_block_size(dim, block_size, expected):
    assert block_width(dim, block_size) == expected
    R = Decorrelation(dim, block_size=block_size).R
    assert R.shape == ((dim, dim) if expected == dim else (dim // expected, expected, expected))
    assert torch.equal(dense(R) if R.dim() == 3 else R, torch.eye(dim))


@pytest.mark.parametrize("reuse", [False, True])  # the fold inside the graph, or cached with W's gradient deferred
@pytest.mark.parametrize("rows", [2, 12])  # the linear's explicit form (2 rows < 3 outputs) and its folded form
def test_every_layer_form_gives_the_outputs_and_gradients_of_the_dense_block_diagonal_R(rows, reuse):
    torch.manual_seed(0)
    model = Layers().double()
    plain = Layers().double()
    plain.load_state_dict(model.state_dict())
    groups = inject_decorrelation(model, {n: [n] for n in ("linear", "conv1d", "patch")}, block_size=4)
    for d in groups.values():
        d.double()
        assert d.R.shape == (2, 4, 4)
        d.R.add_(0.2 * torch.randn_like(d.R))
        d.reuse_fold_in_training = reuse
    micro_batch = [0]
    if reuse:
        defer_weight_gradients(model, lambda: micro_batch[0] == 1)
    for micro_batch[0] in range(2 if reuse else 1):
        x = torch.randn(rows, 8, dtype=torch.float64)
        image = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        loss = model.linear(x).pow(2).sum() + model.conv1d(x).pow(2).sum() + model.patch(image).pow(2).sum()
        loss.backward()
        R = {name: dense(d.R) for name, d in groups.items()}
        patches = F.unfold(image, 2, stride=2).transpose(1, 2) @ R["patch"].T  # (images, patches, 8)
        expected = (
            (x @ R["linear"].T @ plain.linear.weight.T + plain.linear.bias).pow(2).sum()
            + plain.conv1d(x @ R["conv1d"].T).pow(2).sum()
            + (patches @ plain.patch.weight.reshape(4, -1).T + plain.patch.bias).pow(2).sum()
        )
        torch.testing.assert_close(loss, expected)
        expected.backward()
    for name in ("linear", "conv1d", "patch"):
        torch.testing.assert_close(getattr(model, name).weight.grad, getattr(plain, name).weight.grad)
        torch.testing.assert_close(getattr(model, name).bias.grad, getattr(plain, name).bias.grad)
    folded = Layers().double()
    folded.load_state_dict(fold_decorrelation(model), strict=True)
    x, image = torch.randn(rows, 8, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    for name, inputs in (("linear", x), ("conv1d", x), ("patch", image)):
        torch.testing.assert_close(getattr(folded, name)(inputs), getattr(model, name)(inputs))


@pytest.mark.parametrize("rows", [3, 40])  # 2 n < b: the update from the rows themselves; else from z^T z's blocks
def test_each_block_takes_the_update_of_a_full_R_of_its_width_from_its_slice_of_the_rows(rows):
    torch.manual_seed(0)
    d = Decorrelation(12, sample_fraction=1.0, block_size=4).double()
    d.R.add_(0.1 * torch.randn_like(d.R))
    start = d.R.clone()
    x = torch.randn(rows, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    d.observe(x[: rows // 2])
    d.observe(x[rows // 2 :])
    assert (d.sum_zz is None) == (2 * rows < 4)
    loss = decorrelation_step([d], lr=LR, kappa=KAPPA)
    updates = [reference_update(start[i], x[:, 4 * i : 4 * i + 4]) for i in range(3)]
    torch.testing.assert_close(d.R, torch.stack([R for R, _ in updates]))
    # The loss of a block-diagonal R is the mean of its blocks' losses.
    assert loss == pytest.approx(sum(loss.item() for _, loss in updates) / 3, rel=1e-9)


def test_a_plain_model_measures_the_loss_a_block_diagonal_model_starts_from():
    """The BP baseline's monitor with the same block size reports the loss DBP's first step sees."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model = hf_dbp.decorrelate(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        DecorrelationConfig(target_modules=["0", "2"], block_size=4, sample_fraction=1.0),
    )
    model.load_state_dict({**model.state_dict(), **plain.state_dict()})
    monitor = DecorrelationMonitor(plain, {"0": ["0"], "2": ["2"]}, sample_fraction=1.0, block_size=4)
    x = torch.randn(30, 8) * torch.arange(1, 9)
    plain(x), model(x)
    measured = decorrelation_step(list(monitor.decorrelations.values()), lr=0.0, kappa=KAPPA)
    taken = decorrelation_step(hf_dbp.core.model.decorrelation_modules(model), lr=LR, kappa=KAPPA)
    assert measured == pytest.approx(taken, rel=1e-6)


@pytest.mark.parametrize("value", [0, -4, 2.5, True, "64"])
def test_a_bad_block_size_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match=r"DecorrelationConfig\.block_size must be an integer >= 1 or None"):
        DecorrelationConfig(block_size=value)
    with pytest.raises(ValueError, match=r"decorrelation_block_size must be an integer >= 1 or None"):
        ViTMAEDBPConfig(decorrelation_block_size=value)


def test_vit_mae_with_block_diagonal_R_saves_loads_and_merges_exactly(tmp_path):
    torch.manual_seed(0)
    config = ViTMAEDBPConfig(**TINY, decorrelation_block_size=8, decorrelation_lr=0.05)
    model = ViTMAEDBPForPreTraining(config)
    shapes = {tuple(d.R.shape) for d in model.decorrelation_modules()}
    assert all(len(shape) == 3 and shape[1:] == (8, 8) for shape in shapes), shapes
    pixels = torch.randn(4, 3, TINY["image_size"], TINY["image_size"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(pixel_values=pixels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.decorrelation_step()
    assert not any(d.is_identity() for d in model.decorrelation_modules())
    model.eval()
    noise = torch.rand(4, (TINY["image_size"] // TINY["patch_size"]) ** 2)
    expected = model(pixel_values=pixels, noise=noise).logits
    model.save_pretrained(tmp_path / "blocks")
    for loaded in (
        ViTMAEDBPForPreTraining.from_pretrained(tmp_path / "blocks"),
        AutoModelForPreTraining.from_pretrained(tmp_path / "blocks"),
    ):
        assert loaded.config.decorrelation["block_size"] == 8
        for a, b in zip(loaded.decorrelation_modules(), model.decorrelation_modules(), strict=True):
            assert torch.equal(a.R, b.R)
        assert torch.equal(loaded.eval()(pixel_values=pixels, noise=noise).logits, expected)
    card = str(build_model_card(model.config, "blocks"))
    assert "| R | block-diagonal, blocks of at most 8 inputs |" in card
    assert "block-diagonal" not in str(
        build_model_card(ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**TINY)).config, "full")
    )
    plain = model.merge_decorrelation()
    torch.testing.assert_close(plain(pixel_values=pixels, noise=noise).logits, expected, rtol=1e-5, atol=1e-5)
    # A config asking for other blocks than the checkpoint's R: one error that names the R and both shapes.
    with pytest.raises(ValueError, match=r"_decorrelation\.R has shape \(\d+, 8, 8\).*block_size"):
        from_pretrained_checked(ViTMAEDBPForPreTraining, tmp_path / "blocks", decorrelation_block_size=4)
