"""Exact resuming, mixed precision, and the guard against diverging decorrelation updates."""

import dataclasses

import pytest
import torch

from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.core.decorrelation import Decorrelation
from hf_dbp.core.model import decorrelation_step
from hf_dbp.core.step import DecorrelationDiverged
from hf_dbp.tasks.image_data import (
    MAEImageTransform,
    augmentation_epoch_callback,
    demo_image_dataset,
    with_sample_index,
)
from hf_dbp.training.checkpoints import MANIFEST
from hf_dbp.training.training_args import DBPTrainingArguments


@pytest.fixture(scope="module")
def photos():
    """Crops of real photographs through MAE's random augmentation, so resuming must replay the augmentation too."""
    images = with_sample_index(demo_image_dataset(num_train=48, num_validation=1, min_size=24, max_size=48)["train"])
    transform = MAEImageTransform(16, seed=0)
    dataset = images.with_transform(
        lambda batch: {
            "pixel_values": [
                torch.from_numpy(transform(image, index))
                for image, index in zip(batch["image"], batch["sample_index"], strict=True)
            ]
        }
    )
    dataset.augmentation = transform
    return dataset


def train(tmp_path, tiny_kwargs, dataset, max_steps=6, resume=None, **overrides):
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs, decorrelation_lr=1e-2))
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        learning_rate=1e-3,
    )
    values.update(overrides)
    callbacks = [augmentation_epoch_callback(dataset.augmentation)] if hasattr(dataset, "augmentation") else []
    trainer = DBPTrainer(
        model=model,
        args=DBPTrainingArguments(**values, track_emissions=False),
        train_dataset=dataset,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    history = {r["step"]: (r["loss"], r["decorrelation_loss"]) for r in trainer.state.log_history if "loss" in r}
    return model, history


def test_stop_and_resume_gives_the_uninterrupted_run(tmp_path, tiny_kwargs, photos):
    """Two epochs of 3 steps; stopped after step 2 (mid-epoch) and resumed across the epoch boundary."""
    full_model, full = train(tmp_path / "full", tiny_kwargs, photos)
    assert (tmp_path / "full" / "checkpoint-2" / "decorrelation_rng_state_0.pth").is_file()
    resumed_model, resumed = train(
        tmp_path / "resumed", tiny_kwargs, photos, resume=str(tmp_path / "full" / "checkpoint-2")
    )
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-2 come back with the checkpoint's trainer state
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), step
    for a, b in zip(full_model.decorrelation_modules(), resumed_model.decorrelation_modules(), strict=True):
        torch.testing.assert_close(a.R, b.R, rtol=1e-6, atol=1e-7)


def test_resume_restores_the_row_sampling(tmp_path, tiny_kwargs, photos):
    """Without the saved generator state the resumed run samples other rows: the saved state is what makes it exact."""
    _, full = train(tmp_path / "full", tiny_kwargs, photos)
    (tmp_path / "full" / "checkpoint-2" / "decorrelation_rng_state_0.pth").unlink()
    (tmp_path / "full" / "checkpoint-2" / MANIFEST).unlink()  # a checkpoint of hf-dbp 0.1, which had neither
    _, resumed = train(tmp_path / "resumed", tiny_kwargs, photos, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed[3][0] == pytest.approx(full[3][0], rel=1e-6)  # same weights and data up to the R update...
    assert resumed[4][1] != pytest.approx(full[4][1], rel=1e-6)  # ...but other rows were sampled for R


def test_bf16_autocast_on_cpu_keeps_R_and_statistics_in_float32(tmp_path, tiny_kwargs, photos):
    model, history = train(tmp_path, tiny_kwargs, photos, bf16=True, use_cpu=True, save_strategy="no")
    losses = [value for pair in history.values() for value in pair]
    assert all(torch.isfinite(torch.tensor(losses)))
    for d in model.decorrelation_modules():
        assert d.R.dtype == torch.float32 and torch.isfinite(d.R).all()
        assert not torch.equal(d.R, torch.eye(d.dim))
    layer = model.vit.layers[0].mlp.fc1
    x = torch.randn(2, 5, 24)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert layer.decorrelation.second_moment_sum().dtype == torch.float32


def test_guard_skips_or_stops_on_diverging_updates():
    d = Decorrelation(3, sample_fraction=1.0)
    d.observe(torch.full((4, 3), 1e5))  # exploding inputs: loss ~ 1e20
    loss = decorrelation_step([d], lr=0.1, kappa=0.5, max_loss=1e6)
    assert loss > 1e6 and d.skipped_updates == 1  # reported, but the update was refused
    assert torch.equal(d.R, torch.eye(3))
    d.observe(torch.tensor([[float("nan"), 0.0, 1.0]]))
    decorrelation_step([d], lr=0.1, kappa=0.5)
    assert d.skipped_updates == 2 and torch.equal(d.R, torch.eye(3))
    d.observe(torch.full((4, 3), 1e5))
    with pytest.raises(DecorrelationDiverged, match="diverged"):
        decorrelation_step([d], lr=0.1, kappa=0.5, on_divergence="raise")
    d.observe(torch.randn(50, 3))  # healthy statistics: updated as usual
    decorrelation_step([d], lr=0.1, kappa=0.5)
    assert d.skipped_updates == 3 and not torch.equal(d.R, torch.eye(3))


def test_trainer_counts_skipped_updates_or_stops(tmp_path, tiny_kwargs, photos, caplog):
    _, history = train(tmp_path / "skip", tiny_kwargs, photos, max_steps=2, save_strategy="no")
    assert history  # healthy run: nothing skipped
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    args = DBPTrainingArguments(
        output_dir=str(tmp_path / "x"),
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        save_strategy="no",
        track_emissions=False,
        decorrelation_max_loss=0.0,
    )
    trainer = DBPTrainer(model=model, args=args, train_dataset=photos)
    trainer.train()  # every update "explodes" with a bound of 0: all skipped, R untouched, counted, warned
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert records[-1]["decorrelation_skipped_updates"] == 2 * len(model.decorrelation_modules())
    assert all(torch.equal(d.R, torch.eye(d.dim)) for d in model.decorrelation_modules())
    assert "skipped by the guard" in caplog.text
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    args = dataclasses.replace(args, decorrelation_guard="stop")
    trainer = DBPTrainer(model=model, args=args, train_dataset=photos)
    with pytest.raises(DecorrelationDiverged):
        trainer.train()
