"""DBPTrainer: the DBP step after each optimizer step, the logged records, and a short real training run."""

import pytest
import torch
from datasets import Dataset
from transformers import DistilBertConfig, DistilBertModel, TrainingArguments, ViTMAEConfig, ViTMAEForPreTraining

import hf_dbp.core.optimizer_hook
from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.core.step import update_decorrelations as decorrelation_step
from hf_dbp.tasks.image_data import MAEImageTransform, demo_image_dataset


def training_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def noise_images(count=32, size=16):
    return Dataset.from_dict({"pixel_values": torch.randn(count, 3, size, size).numpy()}).with_format("torch")


def test_one_decorrelation_step_per_optimizer_step_with_gradient_accumulation(tmp_path, tiny_kwargs, monkeypatch):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs, decorrelation_sample_fraction=1.0))
    calls = []

    def counting_step(modules, *args, **kwargs):
        calls.append(model.vit.layers[0].attention.qkv_decorrelation.num_rows)
        return decorrelation_step(modules, *args, **kwargs)

    monkeypatch.setattr(hf_dbp.core.optimizer_hook, "update_decorrelations", counting_step)
    args = training_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = DBPTrainer(model=model, args=args, train_dataset=noise_images())
    # The micro-batches of a step share one folded W R.
    assert all(d.reuse_fold_in_training for d in model.decorrelation_modules())
    trainer.train()
    # 3 optimizer steps, each after 2 micro-batches of 4 images x (1 cls + 4 visible patches) rows.
    assert calls == [2 * 4 * 5] * 3
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 3 and all(r["decorrelation_loss"] > 0 for r in records)
    seconds = [r["train_seconds"] for r in records]
    assert all(0 < a < b for a, b in zip(seconds[:-1], seconds[1:], strict=True))


def test_under_gradient_accumulation_W_gets_its_gradient_once_per_step_and_trains_as_before(
    tmp_path, tiny_kwargs, monkeypatch
):
    """DBPTrainer maps the summed gradient of each reused fold to W in a step's last micro-batch only
    (`defer_weight_gradients`, with accelerate's signal that Trainer sets); the weights end where the same run with a
    map per micro-batch ends, up to float rounding."""
    import hf_dbp.training.callbacks as callbacks

    signal = callbacks._last_micro_batch_signal
    answers = []

    def recorded(args, model):
        is_last = signal(args, model)
        assert is_last is not None  # one process, no FSDP or DeepSpeed: the weight gradient may wait
        return lambda: answers.append(is_last()) or answers[-1]

    weights = {}
    for deferred in (True, False):
        monkeypatch.setattr(callbacks, "_last_micro_batch_signal", recorded if deferred else lambda *_: None)
        torch.manual_seed(0)
        model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
        args = training_args(tmp_path, max_steps=3, gradient_accumulation_steps=3, per_device_train_batch_size=4)
        DBPTrainer(model=model, args=args, train_dataset=noise_images()).train()
        weights[deferred] = {k: v.clone() for k, v in model.state_dict().items()}
        assert all(d.is_last_micro_batch is None for d in model.decorrelation_modules())  # off after training
    # The patch conv is always folded: each backward asked, and only a step's last mapped. 32 images make 8
    # micro-batches of 4 an epoch: the third step is the epoch's last two, and maps after its second.
    assert answers == [False, False, True, False, False, True, False, True]
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_gradient_accumulation_training_folds_in_the_graph(tmp_path, tiny_kwargs):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    DBPTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=noise_images())
    assert not any(d.reuse_fold_in_training for d in model.decorrelation_modules())


def test_evaluation_reports_the_mae_loss_and_is_not_counted_as_training_time(tmp_path, tiny_kwargs):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    args = training_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    trainer = DBPTrainer(model=model, args=args, train_dataset=noise_images(), eval_dataset=noise_images(256))
    result = trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert len(evals) == 2 and all(r["eval_loss"] > 0 for r in evals)
    seconds_evaluating = sum(r["eval_runtime"] for r in evals)
    last_training_record = [r for r in trainer.state.log_history if "loss" in r][-1]
    # Wall-clock training time includes both evaluations; train_seconds must not.
    assert seconds_evaluating > 0.1
    assert last_training_record["train_seconds"] < result.metrics["train_runtime"] - 0.9 * seconds_evaluating
    assert trainer.evaluate()["eval_loss"] > 0


def test_plain_model_is_measured_but_not_changed(tmp_path, tiny_kwargs):
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(ViTMAEConfig(**tiny_kwargs))
    keys = set(model.state_dict())
    args = training_args(tmp_path, max_steps=2)
    trainer = DBPTrainer(
        model=model,
        args=args,
        train_dataset=noise_images(),
        decorrelation_config=ViTMAEDBPConfig(decorrelation_layers=["fc1"]),
    )
    trainer.train()
    assert set(model.state_dict()) == keys  # no R was added
    assert list(trainer.decorrelation_callback.decorrelation_config.groups) == [
        "vit.layers.0.mlp.fc1",
        "vit.layers.1.mlp.fc1",
    ]
    assert all(r["decorrelation_loss"] > 0 for r in trainer.state.log_history if "loss" in r)


def test_a_model_without_default_targets_is_refused_with_the_way_out(tmp_path):
    # A plain model is a BP baseline whose decorrelation loss is measured on the architecture's default targets; an
    # architecture without defaults must be told which layers, before any training.
    model = DistilBertModel(DistilBertConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=8, vocab_size=20))
    with pytest.raises(ValueError, match="'distilbert'.*target_modules"):
        DBPTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=noise_images())
    trainer = DBPTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=noise_images(),
        decorrelation_config=hf_dbp.DecorrelationConfig(target_modules=["q_lin", "k_lin", "v_lin"]),
    )
    assert list(trainer.decorrelation_callback.decorrelation_config.groups) == ["transformer.layer.0.attention.qkv"]


def _train_on_natural_images(tmp_path, model, dataset):
    args = training_args(
        tmp_path,
        num_train_epochs=6,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        weight_decay=0.05,
        adam_beta2=0.95,
        logging_steps=4,
        remove_unused_columns=False,
    )
    trainer = DBPTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    return [r["loss"] for r in records], [r["decorrelation_loss"] for r in records]


def test_short_training_on_natural_images(tmp_path, tiny_kwargs):
    """Real training on crops of photographs: DBP lowers both losses, and ends better decorrelated than BP."""
    images = demo_image_dataset(num_train=256, num_validation=1, min_size=24, max_size=64)["train"]
    transform = MAEImageTransform(16)
    dataset = images.with_transform(
        lambda batch: {"pixel_values": [torch.from_numpy(transform(i)) for i in batch["image"]]}
    )
    config = ViTMAEDBPConfig(**tiny_kwargs, norm_pix_loss=True, decorrelation_lr=1e-2)
    torch.manual_seed(0)
    dbp = ViTMAEDBPForPreTraining(config)
    bp = dbp.merge_decorrelation()  # the same initial weights, as a plain model

    torch.manual_seed(0)
    dbp_loss, dbp_decorrelation = _train_on_natural_images(tmp_path / "dbp", dbp, dataset)
    torch.manual_seed(0)
    bp_loss, bp_decorrelation = _train_on_natural_images(tmp_path / "bp", bp, dataset)

    def mean(values):
        return sum(values) / len(values)

    assert mean(dbp_loss[-3:]) < 0.9 * mean(dbp_loss[:3])
    assert mean(dbp_decorrelation[-3:]) < 0.5 * mean(dbp_decorrelation[:3])
    assert mean(dbp_decorrelation[-3:]) < mean(bp_decorrelation[-3:])


def test_no_pinned_memory_is_asked_for_without_an_accelerator(tmp_path):
    """torch warns at every data loader that pins memory without an accelerator (about 18 times in the demo)."""
    import warnings

    from hf_dbp.training.training_args import DBPTrainingArguments

    args = DBPTrainingArguments(tmp_path, report_to="none", use_cpu=True, track_emissions=False)
    assert args.dataloader_pin_memory is False
    loader_warnings = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from datasets import Dataset

        from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining

        model = ViTMAEDBPForPreTraining(
            ViTMAEDBPConfig(
                image_size=16,
                patch_size=4,
                hidden_size=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=48,
                decoder_hidden_size=16,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=32,
            )
        )
        data = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 16, 16).numpy()}).with_format("torch")
        trainer = DBPTrainer(model=model, args=args, train_dataset=data)
        next(iter(trainer.get_train_dataloader()))
        loader_warnings = [w for w in caught if "pin_memory" in str(w.message)]
    assert loader_warnings == []
