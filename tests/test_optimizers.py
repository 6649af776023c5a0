"""Peer optimizers: torch's Muon on the hidden matrices with AdamW on the rest, as one optimizer, with and without DBP."""

import copy

import pytest
import torch
from datasets import Dataset

import hf_dbp.core.optimizer_hook
from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.core.inject import decorrelation_matrices
from hf_dbp.core.step import update_decorrelations as decorrelation_step
from hf_dbp.training.optimizers import CombinedOptimizer, muon_matrices, muon_with_adamw
from hf_dbp.training.training_args import DBPTrainingArguments


def noise_images(count=16, size=16):
    return Dataset.from_dict({"pixel_values": torch.randn(count, 3, size, size).numpy()}).with_format("torch")


def loss_of(model, seed):
    return model(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))).loss


def test_muon_takes_the_hidden_matrices_only(tiny_kwargs):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    names = set(muon_matrices(model))
    assert "vit.layers.0.attention.q_proj.weight" in names and "vit.layers.1.mlp.fc2.weight" in names
    assert "decoder.decoder_layers.0.mlp.fc1.weight" in names and "decoder.decoder_embed.weight" in names
    assert "decoder.decoder_pred.weight" not in names  # the output layer stays with AdamW
    assert not any(n.endswith(("bias", "_decorrelation.R", "projection.weight", "cls_token")) for n in names)
    assert not any("layernorm" in n or "position" in n for n in names)
    shapes = dict(model.named_parameters())
    assert all(shapes[n].ndim == 2 for n in names)


def test_combined_optimizer_steps_as_its_parts_and_resumes_exactly(tiny_kwargs):
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    twin = copy.deepcopy(model)
    decay = {n for n, p in model.named_parameters() if p.ndim > 1}
    combined = muon_with_adamw(model, 1e-2, 0.05, decay, adam_betas=(0.9, 0.95), muon_lr_multiplier=4.0)
    assert isinstance(combined, CombinedOptimizer) and len(combined.optimizers) == 2
    muon, adamw = combined.optimizers
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n in set(muon_matrices(model))
    }
    assert all(g["lr"] == pytest.approx(4e-2) for g in muon.param_groups)
    assert not {id(R) for R in decorrelation_matrices(model)} & {
        id(p) for g in combined.param_groups for p in g["params"]
    }
    # The same two optimizers built by hand on the twin, stepped one after the other.
    twin_matrices = [p for n, p in twin.named_parameters() if n in set(muon_matrices(twin))]
    twin_rest = [(n, p) for n, p in twin.named_parameters() if p.requires_grad and n not in set(muon_matrices(twin))]
    hand_muon = torch.optim.Muon(twin_matrices, lr=4e-2, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    hand_adamw = torch.optim.AdamW(
        [
            {"params": [p for n, p in twin_rest if n in decay], "weight_decay": 0.05},
            {"params": [p for n, p in twin_rest if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    for seed in range(2):
        for m in (model, twin):
            torch.manual_seed(seed)  # the same masks
            loss_of(m, seed).backward()
        combined.step(), hand_muon.step(), hand_adamw.step()
        combined.zero_grad(), hand_muon.zero_grad(), hand_adamw.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    # A scheduler reaches every group; a saved state resumes to the same next step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(combined, lambda step: 0.5)
    assert muon.param_groups[0]["lr"] == pytest.approx(2e-2) and adamw.param_groups[0]["lr"] == pytest.approx(5e-3)
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(combined.state_dict())
    resumed = muon_with_adamw(saved_model, 1e-2, 0.05, decay, adam_betas=(0.9, 0.95), muon_lr_multiplier=4.0)
    resumed.load_state_dict(saved_state)
    assert (
        resumed.optimizers[0].state is resumed.state
        and resumed.optimizers[0].param_groups[0] is resumed.param_groups[0]
    )
    for m, optimizer in ((model, combined), (saved_model, resumed)):
        torch.manual_seed(5)
        loss_of(m, 5).backward()
        optimizer.step()
    for (name, a), b in zip(model.named_parameters(), saved_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    del scheduler


def test_dbp_trainer_with_muon_trains_the_weights_and_leaves_R_to_dbp(tmp_path, tiny_kwargs):
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs, decorrelation_lr=1e-2))
    before = copy.deepcopy(model.state_dict())
    args = DBPTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        track_emissions=False,
        use_cpu=True,
        matrix_optimizer="muon",
        muon_lr_multiplier=4.0,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
    )
    trainer = DBPTrainer(model=model, args=args, train_dataset=noise_images())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, CombinedOptimizer)  # accelerate wraps it
    after = model.state_dict()
    assert not torch.equal(after["vit.layers.0.mlp.fc1.weight"], before["vit.layers.0.mlp.fc1.weight"])
    qkv = "vit.layers.0.attention.qkv_decorrelation.R"
    assert not torch.equal(after[qkv], before[qkv])  # DBP moved R, after Muon's steps
    assert all(r["decorrelation_loss"] > 0 for r in trainer.state.log_history if "loss" in r)


def test_unknown_matrix_optimizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="matrix_optimizer"):
        DBPTrainingArguments(output_dir=str(tmp_path), matrix_optimizer="lion")


def _train(tmp_path, tiny_kwargs, max_steps=3, **overrides):
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs, decorrelation_lr=1e-2))
    before = copy.deepcopy(model.state_dict())
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        track_emissions=False,
        use_cpu=True,
        learning_rate=1e-3,
    )
    trainer = DBPTrainer(
        model=model,
        args=DBPTrainingArguments(**settings | overrides),
        train_dataset=noise_images(),
        eval_dataset=noise_images(8),
    )
    return trainer, before


def _optimized(optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_soap_takes_the_hidden_matrices_and_dbp_still_moves_R(tmp_path, tiny_kwargs):
    from pytorch_optimizer import SOAP

    trainer, before = _train(tmp_path, tiny_kwargs, matrix_optimizer="soap", lr_scheduler_type="cosine")
    trainer.train()
    combined = trainer.optimizer.optimizer
    assert isinstance(combined, CombinedOptimizer) and isinstance(combined.optimizers[0], SOAP)
    model = trainer.model
    matrices = set(muon_matrices(model))
    assert _optimized(combined.optimizers[0]) == {id(p) for n, p in model.named_parameters() if n in matrices}
    assert not {id(R) for R in decorrelation_matrices(model)} & _optimized(combined)
    after = model.state_dict()
    for name in ("vit.layers.0.mlp.fc1.weight", "vit.layers.0.attention.qkv_decorrelation.R"):
        assert not torch.equal(after[name], before[name]), name


def test_schedule_free_adamw_from_transformers_trains_with_dbp(tmp_path, tiny_kwargs):
    from schedulefree import AdamWScheduleFree

    trainer, before = _train(
        tmp_path, tiny_kwargs, optim="schedule_free_adamw", lr_scheduler_type="constant", warmup_steps=1
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, AdamWScheduleFree)
    assert not {id(R) for R in decorrelation_matrices(trainer.model)} & _optimized(trainer.optimizer)
    assert "eval_loss" in trainer.evaluate()  # transformers switches the optimizer to its averaged weights for it
    qkv = "vit.layers.0.attention.qkv_decorrelation.R"
    assert not torch.equal(trainer.model.state_dict()[qkv], before[qkv])


def test_tied_decorrelation_lr_follows_the_weights_schedule(tmp_path, tiny_kwargs, monkeypatch):
    scales = {}
    for schedule in ("constant", "tied"):
        trainer, _ = _train(
            tmp_path / schedule,
            tiny_kwargs,
            max_steps=6,
            lr_scheduler_type="linear",
            warmup_steps=2,
            decorrelation_lr_schedule=schedule,
        )
        seen, lrs = [], []

        def recording(modules, lr, *args, _seen=seen, _trainer=trainer, _lrs=lrs, **kwargs):
            _seen.append(lr / _trainer.model.config.decorrelation_lr)  # the lr R's update used, over the config's
            _lrs.append(_trainer.optimizer.param_groups[0]["lr"])  # the lr the optimizer step just used
            return decorrelation_step(modules, lr, *args, **kwargs)

        monkeypatch.setattr(hf_dbp.core.optimizer_hook, "update_decorrelations", recording)
        trainer.train()
        scales[schedule] = (seen, lrs)
    assert scales["constant"][0] == [1.0] * 6
    seen, lrs = scales["tied"]
    assert seen == pytest.approx([lr / 1e-3 for lr in lrs]) and len(seen) == 6
    assert seen == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])  # transformers' linear warm-up starts at 0


def test_unknown_decorrelation_lr_schedule_is_refused(tmp_path):
    with pytest.raises(ValueError, match="decorrelation_lr_schedule"):
        DBPTrainingArguments(output_dir=str(tmp_path), decorrelation_lr_schedule="cosine")
