"""DBP in every common training loop, each run for real on a tiny model: plain PyTorch (with fp16's GradScaler),
Accelerate on 2 processes, PyTorch Lightning, transformers' Trainer (your own subclass and DBPTrainer), and TRL's
SFTTrainer; and the errors that stop a wrong set-up before the first step. docs/integrations/ has a page for each.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import accelerate_worker
import pytest
import torch
from conftest import free_port, offline_env
from datasets import Dataset
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_dbp
from hf_dbp import DecorrelationConfig
from hf_dbp.core.decorrelation import Decorrelation
from hf_dbp.core.model import decorrelation_modules

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    """A plain module (no `config`): two branches that read the same input, then a head inside an `nn.Sequential`."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(8, 16)
        self.right = nn.Linear(8, 16)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.left(x), self.right(x)], dim=-1))


TARGETS = ["left", "right", "head.1"]
TRACED = {"left_right": ["left", "right"], "head.1": ["head.1"]}


def correlated_data(samples: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    return x, torch.randn(samples, 4, generator=generator)


def decorrelated_mlp(sample_fraction: float = 0.5, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    config = DecorrelationConfig(target_modules=TARGETS, lr=1e-2, kappa=0.1, sample_fraction=sample_fraction)
    return hf_dbp.decorrelate(MLP(), config, example_inputs=(torch.zeros(2, 8),))


def matrices(model: nn.Module) -> list[torch.Tensor]:
    return [d.R.detach().clone() for d in decorrelation_modules(model)]


def assert_moved(model: nn.Module) -> None:
    for d in decorrelation_modules(model):
        assert not torch.equal(d.R, torch.eye(d.dim)), "an R is still the identity after training"


def plain_steps(model: nn.Module, optimizer, steps: range, batch: int = 8) -> None:
    """Optimizer steps `steps` of a plain loop over fixed batches (batch k is the same in every run)."""
    x, y = correlated_data()
    for step in steps:
        rows = slice(step * batch % len(x), step * batch % len(x) + batch)
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()


# 1. Plain PyTorch


def test_plain_module_plan_from_tuple_dict_or_tensor_inputs():
    plans = []
    for inputs in ((torch.zeros(2, 8),), {"x": torch.zeros(2, 8)}, torch.zeros(2, 8)):
        model = hf_dbp.decorrelate(MLP(), DecorrelationConfig(target_modules=TARGETS), example_inputs=inputs)
        plans.append(model.decorrelation_config.groups)
    # Traced: left and right read the same tensor, so they share one R.
    assert plans == [TRACED] * 3
    assert model.left.decorrelation is model.right.decorrelation
    # Without an input nothing says which layers share one: each gets its own.
    alone = hf_dbp.decorrelate(MLP(), DecorrelationConfig(target_modules=TARGETS))
    assert alone.decorrelation_config.groups == {"left": ["left"], "right": ["right"], "head.1": ["head.1"]}


def test_plain_loop_trains_saves_loads_merges_and_detaches(tmp_path):
    model = decorrelated_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hook = hf_dbp.attach_decorrelation(optimizer, model)
    plain_steps(model, optimizer, range(5))
    assert hook.optimizer_steps == 5
    assert_moved(model)
    x, _ = correlated_data(16, seed=2)
    model.eval()
    expected = model(x)

    # state_dict into a freshly decorrelated MLP (the plan is kept with the model: no tracing needed).
    fresh = hf_dbp.decorrelate(MLP(), model.decorrelation_config).eval()
    fresh.load_state_dict(torch.load(_saved(model.state_dict(), tmp_path / "state.pt")))
    assert torch.equal(fresh(x), expected)

    # The whole module, pickled.
    loaded = torch.load(_saved(model, tmp_path / "model.pt"), weights_only=False).eval()
    assert torch.equal(loaded(x), expected)
    assert hf_dbp.decorrelation_config_of(loaded) == model.decorrelation_config

    # Merged: plain layers, no R anywhere, the same outputs.
    merged = hf_dbp.merge_decorrelation(model)
    assert {type(m) for m in (merged.left, merged.right, merged.head[1])} == {nn.Linear}
    assert not any(isinstance(m, Decorrelation) for m in merged.modules())
    assert not any(k.endswith(".R") for k in merged.state_dict())
    assert hf_dbp.decorrelation_config_of(merged) is None
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)
    assert decorrelation_modules(model)  # merging worked on a copy

    # Detached: optimizer steps no longer move R.
    hook.remove()
    before = matrices(model.train())
    plain_steps(model, optimizer, range(5, 7))
    assert hook.optimizer_steps == 5
    assert all(torch.equal(a, b) for a, b in zip(before, matrices(model), strict=True))


def _saved(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_plain_loop_resumed_from_model_optimizer_and_hook_state_is_bitwise_uninterrupted(tmp_path):
    def run(steps: range, checkpoint: Path | None = None, hook_state: bool = True):
        model = decorrelated_mlp(sample_fraction=0.5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        hook = hf_dbp.attach_decorrelation(optimizer, model)  # before loading the optimizer's state: R left its groups
        if checkpoint is not None:
            state = torch.load(checkpoint)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if hook_state:
                hook.load_state_dict(state["dbp"])
        plain_steps(model, optimizer, steps)
        return model, optimizer, hook

    uninterrupted, _, _ = run(range(6))
    model, optimizer, hook = run(range(3))
    checkpoint = _saved(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dbp": hook.state_dict()},
        tmp_path / "checkpoint.pt",
    )
    resumed, _, resumed_hook = run(range(3, 6), checkpoint)
    assert resumed_hook.optimizer_steps == 6
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # Without the hook's state the rows of R's statistics are drawn afresh: the test can tell.
    forgetful, _, _ = run(range(3, 6), checkpoint, hook_state=False)
    assert not all(torch.equal(a, b) for a, b in zip(matrices(forgetful), matrices(uninterrupted), strict=True))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize(
    "make, targets",
    [
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), ["0", "2"]),
        (Stack, ["layers.0", "layers.1", "layers.2"]),
    ],
    ids=["sequential", "module_list"],
)
def test_layers_of_a_sequential_or_module_list_keep_the_forward(make, targets):
    # nn.Sequential runs every child and a loop over a ModuleList sees every entry: R registered there would run as
    # a layer (a shape error in the Sequential, an extra R x silently applied in the loop).
    model = make()
    children = len(list(model.modules()))
    hf_dbp.decorrelate(model, DecorrelationConfig(target_modules=targets), example_inputs=torch.zeros(2, 8))
    generator = torch.Generator().manual_seed(0)
    for d in decorrelation_modules(model):
        d.R.add_(0.1 * torch.randn(d.R.shape, generator=generator))
    x = torch.randn(5, 8, generator=generator)
    plain = hf_dbp.merge_decorrelation(model)
    assert len(list(plain.modules())) == children
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)


# 2. fp16 and GradScaler


def test_a_step_the_grad_scaler_skips_leaves_R_and_keeps_its_statistics_for_the_next_step():
    model = decorrelated_mlp(sample_fraction=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = hf_dbp.attach_decorrelation(optimizer, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = correlated_data(48)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in (0, 16, 32)]

    def forward_backward(batch, twin=None):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss((model if twin is None else twin)(batch[0]).float(), batch[1])
        if twin is None:
            scaler.scale(loss).backward()

    forward_backward(batches[0])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert hook.optimizer_steps == 1
    assert_moved(model)
    twin = copy.deepcopy(model)  # the same weights and R, for what the next real step must compute

    forward_backward(batches[1])
    model.left.weight.grad[0, 0] = float("inf")  # an overflow: the scaler skips this step
    after_first = matrices(model)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**9  # the scaler did skip
    assert hook.optimizer_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(after_first, matrices(model), strict=True))
    assert all(d.num_rows == 16 for d in decorrelation_modules(model))  # the skipped step's rows wait

    forward_backward(batches[2])
    scaler.step(optimizer)
    scaler.update()
    assert hook.optimizer_steps == 2
    # The real step used the rows of both forwards since the last real step (the weights did not change between).
    with torch.no_grad():
        for batch in batches[1:]:
            forward_backward(batch, twin)
    hf_dbp.decorrelation_step(twin)
    assert all(torch.equal(a, b) for a, b in zip(matrices(twin), matrices(model), strict=True))


# 3. Accelerate on 2 processes


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory) -> list[dict]:
    """One `accelerate launch` of tests/accelerate_worker.py on 2 CPU processes (gloo), for every check below.

    accelerate starts several processes only through its multi-GPU launcher (torchrun underneath); the worker's
    `Accelerator(cpu=True)` then trains on the CPUs over gloo."""
    folder = tmp_path_factory.mktemp("accelerate")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "accelerate_worker.py"),
        str(folder),
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=offline_env(folder / "hf"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def test_accelerate_updates_R_once_per_optimizer_step_identically_on_both_processes(accelerate_run):
    first, second = accelerate_run
    assert first["world_size"] == second["world_size"] == 2
    for record in (first["compare"], second["compare"]):
        assert record["optimizer_steps"] == 4  # 8 micro-batches, 2 per optimizer step
        assert record["moved"] == [False, True] * 4  # R moves at the step after the second micro-batch only
    for a, b in zip(first["compare"]["R"], second["compare"]["R"], strict=True):
        assert torch.equal(a, b) and not torch.equal(a, torch.eye(a.shape[0]))


def test_accelerate_on_two_processes_equals_one_process_over_the_same_samples(accelerate_run):
    # One process, no Accelerate: each micro-batch holds what both processes saw in theirs (process 0 takes batches
    # 0, 2, ... of the data loader, process 1 batches 1, 3, ...); the loss is divided over the 2 micro-batches as
    # accelerator.backward does, and DDP's mean over 2 processes of 2 samples is the mean over 4.
    model = accelerate_worker.build_model(sample_fraction=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=accelerate_worker.LEARNING_RATE)
    hook = hf_dbp.attach_decorrelation(optimizer, model)
    steps = accelerate_worker.GRADIENT_ACCUMULATION_STEPS
    loader = torch.utils.data.DataLoader(accelerate_worker.dataset(), batch_size=2 * accelerate_worker.BATCH_SIZE)
    for i, (x, y) in enumerate(loader):
        (nn.functional.mse_loss(model(x), y) / steps).backward()
        if (i + 1) % steps == 0:
            optimizer.step()
            optimizer.zero_grad()
    assert hook.optimizer_steps == 4
    record = accelerate_run[0]["compare"]
    for a, b in zip(matrices(model), record["R"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(record["weights"][name], value, rtol=1e-5, atol=1e-6)


def test_accelerate_save_state_and_load_state_resume_the_hook(accelerate_run):
    for record in accelerate_run:
        resume = record["resume"]
        assert resume["steps"] == 4
        assert all(torch.equal(a, b) for a, b in zip(resume["resumed"], resume["full"], strict=True))
        # Without the hook registered for checkpointing, the resumed run draws other rows for R's statistics.
        assert not all(torch.equal(a, b) for a, b in zip(resume["without_hook_state"], resume["full"], strict=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(accelerate_run[0]["resume"]["resumed"], accelerate_run[1]["resume"]["resumed"], strict=True)
    )


# 4. PyTorch Lightning


def lightning_classes():
    import lightning as L

    class LitMLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = decorrelated_mlp(sample_fraction=0.5)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class DecorrelationStep(L.Callback):
        """The callback of docs/integrations/lightning.md: the hook on the optimizer Lightning set up, its state in
        Lightning's checkpoints."""

        def __init__(self) -> None:
            self.hook = None
            self._state = None
            self.moved = []  # per training batch: whether R moved

        def on_fit_start(self, trainer, pl_module):
            self.hook = hf_dbp.attach_decorrelation(trainer.optimizers[0], pl_module)
            if self._state is not None:
                self.hook.load_state_dict(self._state)

        def state_dict(self):
            return self.hook.state_dict() if self.hook is not None else {}

        def load_state_dict(self, state_dict):
            self._state = state_dict
            if self.hook is not None:  # strategies that restore after setting up (DeepSpeed)
                self.hook.load_state_dict(state_dict)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._before = matrices(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.moved.append(
                any(not torch.equal(a, b) for a, b in zip(self._before, matrices(pl_module), strict=True))
            )

        def on_fit_end(self, trainer, pl_module):
            self.hook.remove()

    return L, LitMLP, DecorrelationStep


def test_lightning_updates_R_once_per_optimizer_step_and_resumes_from_its_checkpoint(tmp_path):
    L, LitMLP, DecorrelationStep = lightning_classes()
    x, y = correlated_data(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)  # 8 batches per epoch

    def fit(epochs: int, ckpt_path=None):
        module, callback = LitMLP(), DecorrelationStep()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            accumulate_grad_batches=2,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainer, module, callback

    trainer, module, callback = fit(2)
    assert trainer.global_step == callback.hook.optimizer_steps == 8
    assert callback.moved == [False, True] * 8
    assert_moved(module)

    first, _, _ = fit(1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed, resumed_callback = fit(2, ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed_callback.hook.optimizer_steps == 8
    assert resumed_callback.moved == [False, True] * 4
    for name, value in module.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# 5. transformers: your own Trainer with DecorrelationCallback, or DBPTrainer


def tiny_llama(vocab_size: int = 40) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def token_data() -> Dataset:
    ids = torch.randint(2, 40, (16, 12), generator=torch.Generator().manual_seed(3))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def trainer_arguments(tmp_path, arguments_class=TrainingArguments, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return arguments_class(**{**values, **overrides})


class CountingTrainer(Trainer):
    """A user's own Trainer subclass, knowing nothing of DBP."""

    micro_batches = 0

    def training_step(self, *args, **kwargs):
        self.micro_batches += 1
        return super().training_step(*args, **kwargs)


def test_own_trainer_subclass_with_the_callback_ends_bitwise_where_dbp_trainer_does(tmp_path):
    model = hf_dbp.decorrelate(tiny_llama(), DecorrelationConfig(lr=1e-2))
    own = CountingTrainer(
        model=model,
        args=trainer_arguments(tmp_path / "own"),
        train_dataset=token_data(),
        callbacks=[hf_dbp.DecorrelationCallback()],
    )
    own.train()
    reference = hf_dbp.decorrelate(tiny_llama(), DecorrelationConfig(lr=1e-2))
    arguments = trainer_arguments(tmp_path / "dbp", hf_dbp.DBPTrainingArguments, track_emissions=False)
    hf_dbp.DBPTrainer(model=reference, args=arguments, train_dataset=token_data()).train()

    assert own.micro_batches == 6
    assert_moved(model)
    for a, b in zip(matrices(model), matrices(reference), strict=True):
        assert torch.equal(a, b)
    records = [r for r in own.state.log_history if "loss" in r]
    assert len(records) == 3 and all(r["decorrelation_loss"] > 0 for r in records)


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps, as a run killed after its checkpoint there would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_own_trainer_with_the_callback_resumes_from_its_checkpoint_bitwise(tmp_path):
    def run(output_dir: Path, callbacks=(), resume: bool = False, **extra):
        model = hf_dbp.decorrelate(tiny_llama(), DecorrelationConfig(lr=1e-2))
        arguments = trainer_arguments(output_dir, max_steps=4, **extra)
        trainer = CountingTrainer(
            model=model,
            args=arguments,
            train_dataset=token_data(),
            callbacks=[hf_dbp.DecorrelationCallback(), *callbacks],
        )
        trainer.train(resume_from_checkpoint=resume or None)
        return model, trainer

    uninterrupted, _ = run(tmp_path / "uninterrupted")
    run(tmp_path / "run", callbacks=[StopAt(2)], save_strategy="steps", save_steps=2)
    assert (tmp_path / "run" / "checkpoint-2" / "decorrelation_rng_state_0.pth").is_file()
    resumed, trainer = run(tmp_path / "run", resume=True)
    assert trainer.state.global_step == 4 and trainer.micro_batches == 4
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# 6. TRL


def char_tokenizer():
    """A character-level tokenizer built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .,")}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def test_trl_sft_trainer_with_the_callback(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = char_tokenizer()
    model = hf_dbp.decorrelate(tiny_llama(len(tokenizer)), DecorrelationConfig(lr=1e-2))
    data = Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog.", "pack my box with jugs."] * 8})
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        max_length=48,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    callback = hf_dbp.DecorrelationCallback.add_to(trainer)
    trainer.train()
    assert callback.hook.optimizer_steps == 3
    assert_moved(model)
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 3 and all(r["decorrelation_loss"] > 0 for r in records)


# 7. Wrong set-ups, refused before the first step


def test_wrong_set_ups_are_refused_naming_the_module_or_argument(tmp_path):
    with pytest.raises(ValueError, match=r"no layer of MLP matches target_modules=\['fc9'\]"):
        hf_dbp.decorrelate(MLP(), DecorrelationConfig(target_modules=["fc9"]))
    with pytest.raises(ValueError, match=r"target module 'head.0' \(Tanh\) cannot be decorrelated.*nn.Linear"):
        hf_dbp.decorrelate(MLP(), DecorrelationConfig(target_modules=["left", "head.0"]))
    convolutional = nn.Sequential(nn.Conv2d(3, 4, kernel_size=3, padding=1))
    with pytest.raises(ValueError, match=r"target module '0' is an nn.Conv2d that is not patchifying"):
        hf_dbp.decorrelate(convolutional, DecorrelationConfig(target_modules=["0"]))

    model = decorrelated_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hf_dbp.attach_decorrelation(optimizer, model)
    with pytest.raises(ValueError, match="DBP is attached to this SGD already"):
        hf_dbp.attach_decorrelation(optimizer, model)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the SGD holds none of MLP's trainable parameters"):
        hf_dbp.attach_decorrelation(other, model)
    with pytest.raises(ValueError, match="MLP has no R: decorrelate it first"):
        hf_dbp.attach_decorrelation(torch.optim.SGD(MLP().parameters(), lr=0.1), MLP())

    with pytest.raises(ValueError, match="LlamaForCausalLM has no R and no DecorrelationConfig: decorrelate it first"):
        Trainer(
            model=tiny_llama(),
            args=trainer_arguments(tmp_path),
            train_dataset=token_data(),
            callbacks=[hf_dbp.DecorrelationCallback()],
        )
