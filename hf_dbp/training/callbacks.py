"""`TrainerCallback`s that give any `transformers.Trainer` what hf-dbp adds: the decorrelation step
([`DecorrelationCallback`], for TRL's trainers, `Seq2SeqTrainer` or a Trainer subclass of your own), training time and
a time budget ([`TrainingClockCallback`]), and energy and emissions ([`EmissionsCallback`]). `DBPTrainer` is
`Trainer` with these three.

```python
trainer = SFTTrainer(model=hf_dbp.decorrelate(model), args=args, train_dataset=data)
hf_dbp.DecorrelationCallback.add_to(trainer)  # or Trainer(..., callbacks=[hf_dbp.DecorrelationCallback()])
trainer.train()
```
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.config import CONFIG_ATTRIBUTE, DecorrelationConfig
from ..core.engines import prepare_for_deepspeed
from ..core.inject import decorrelation_matrices, drop_decorrelation_matrices
from ..core.layers import clear_folded_weights
from ..core.model import decorrelation_config_of, decorrelation_modules, defer_weight_gradients
from ..core.optimizer_hook import DecorrelationHook
from ..core.plan import plan_decorrelation
from .emissions import EmissionsMeter, EmissionsReport, carried_for_machine, resolve_country
from .training_args import dbp_argument

logger = logging.getLogger(__name__)


def _gather(item) -> list:
    """One picklable object from every process, in rank order; every process must call it together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [item]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, item)
    return gathered


def _uses_deepspeed(args: TrainingArguments) -> bool:
    """Whether the Trainer with these arguments runs DeepSpeed (a `deepspeed` config, or `accelerate launch` with a
    DeepSpeed config file)."""
    return getattr(args, "deepspeed_plugin", None) is not None


def _last_micro_batch_signal(args: TrainingArguments, model) -> Callable[[], bool] | None:
    """Trainer's signal of a step's last micro-batch, where W's gradient may wait for it
    ([`~hf_dbp.defer_weight_gradients`]): under gradient accumulation on one process or under DDP, whose `no_sync`
    Trainer keeps until the last micro-batch. None under FSDP and DeepSpeed, which reduce or partition each
    micro-batch's gradient as it comes, and where accelerate syncs every batch (`sync_each_batch`).

    The signal is accelerate's `GradientState().sync_gradients`, which Trainer sets before each micro-batch (True for
    the last one of a step, the last of an epoch included)."""
    if args.gradient_accumulation_steps <= 1 or _uses_deepspeed(args) or model is None:
        return None
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType
    from torch.distributed.tensor import DTensor

    engine = AcceleratorState().distributed_type if AcceleratorState._shared_state else DistributedType.NO
    if engine in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA):
        return None
    if any(isinstance(p, DTensor) for p in model.parameters()):  # sharded by transformers at load time (FSDP2, TP)
        return None
    gradient_state = GradientState()
    if gradient_state.plugin_kwargs.get("sync_each_batch", False):
        return None
    return lambda: gradient_state.sync_gradients


def _process_index() -> int:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


def _update_log_record(state, logs: dict, values: dict) -> None:
    """Add `values` to the record `Trainer.log` passes to `on_log` and to the copy it appended to `log_history`."""
    logs.update(values)
    record = state.log_history[-1] if state.log_history else None
    if record is not None and all(record.get(k) == v for k, v in logs.items() if k not in values):
        record.update(values)


class DecorrelationCallback(TrainerCallback):
    """DBP in any `transformers.Trainer`: the decorrelation step after every real optimizer step, and
    `decorrelation_loss` in the logs.

    What it does, on every process: it keeps R out of the optimizer (R is frozen before the Trainer builds it, and
    dropped from an optimizer you pass that holds it); it attaches a [`~hf_dbp.DecorrelationHook`] to the Trainer's
    optimizer, so R is updated after each optimizer step that really ran (after gradient accumulation, never after a
    step fp16's grad scaler skipped); over several processes it starts exchanging the statistics right after the
    forward of each step's last micro-batch, so that they travel during the backward; it saves and restores the state
    of the generators that draw the statistics' rows with every checkpoint; and at the end of training it checks that
    R is the same on every process.

    Given a plain model (the BP baseline), with `decorrelation_config`, it measures the decorrelation loss of the layers
    that config selects without changing the model, so BP and DBP runs report comparable figures.

    Args:
        decorrelation_config ([`DecorrelationConfig`], *optional*):
            For a plain model only: which layers to measure, the sample fraction and the kappa of the loss.
        lr_schedule, update_every, transfer_dtype, guard, max_loss:
            As in [`~hf_dbp.DecorrelationHook`]; `DBPTrainingArguments` names them `decorrelation_<name>`.
        overlap (`bool`, defaults to `True`):
            Over several processes, start the exchange after the step's last forward (off under fp16, whose grad
            scaler may skip the step).

    Add it first (`DecorrelationCallback.add_to(trainer)`, as `DBPTrainer` does) for `decorrelation_loss` to reach the
    console and every `report_to` integration; added last, it reaches `log_history` and `trainer_state.json`.
    """

    STATE_FILE = "decorrelation_rng_state_{}.pth"
    """The file of process k's DBP state in a checkpoint (the name checkpoints of hf-dbp 0.1 used)."""

    def __init__(
        self,
        decorrelation_config: DecorrelationConfig | None = None,
        *,
        lr_schedule: str = "constant",
        update_every: int = 1,
        transfer_dtype: str | None = None,
        overlap: bool = True,
        guard: str = "skip",
        max_loss: float = 1e6,
    ) -> None:
        values = getattr(decorrelation_config, CONFIG_ATTRIBUTE, None)
        if isinstance(values, Mapping):  # a model config that carries one (a DBP run's, for its BP baseline)
            decorrelation_config = DecorrelationConfig.from_dict(dict(values)).replace(groups=None)
        if decorrelation_config is not None and not isinstance(decorrelation_config, DecorrelationConfig):
            raise TypeError(
                "decorrelation_config must be an hf_dbp.DecorrelationConfig (or a model config holding one), got "
                f"{type(decorrelation_config).__name__}"
            )
        self.decorrelation_config = decorrelation_config
        self.options = dict(
            lr_schedule=lr_schedule,
            update_every=update_every,
            transfer_dtype=transfer_dtype,
            guard=guard,
            max_loss=max_loss,
        )
        DecorrelationHook.check_options(**self.options)
        self.overlap = overlap
        self.hook: DecorrelationHook | None = None
        self.resume_from: str | None = None  # the checkpoint train() resumes from, where known (DBPTrainer sets it)
        self._forward_hook = None
        self._checked_model = None

    @classmethod
    def from_args(cls, args: TrainingArguments, decorrelation_config: DecorrelationConfig | None = None):
        """The callback with the settings of `args` (`DBPTrainingArguments`; their defaults for other arguments)."""
        transfer = dbp_argument(args, "decorrelation_transfer_dtype")
        return cls(
            decorrelation_config,
            lr_schedule=dbp_argument(args, "decorrelation_lr_schedule"),
            update_every=dbp_argument(args, "decorrelation_update_every"),
            transfer_dtype=None if transfer == "float32" else transfer,
            overlap=dbp_argument(args, "decorrelation_overlap"),
            guard=dbp_argument(args, "decorrelation_guard"),
            max_loss=dbp_argument(args, "decorrelation_max_loss"),
        )

    @classmethod
    def add_to(cls, trainer, *args, **kwargs) -> DecorrelationCallback:
        """Add a new callback to `trainer` ahead of its others (so its logs reach every reporter), and check the model
        now; returns it."""
        callback = cls(*args, **kwargs)
        callback.prepare(
            trainer.model, trainer.optimizer, trainer.args.gradient_accumulation_steps, trainer.is_deepspeed_enabled
        )
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def prepare(self, model, optimizer=None, gradient_accumulation_steps: int = 1, deepspeed: bool = False) -> None:
        """Check that `model` can be trained with DBP and keep R out of every optimizer (before the Trainer builds its
        own, and before DDP, FSDP or DeepSpeed wraps the model). Under DeepSpeed (`deepspeed=True`) every R becomes a
        buffer ([`~hf_dbp.prepare_for_deepspeed`]), which ZeRO neither partitions nor optimises. Raises a
        `ValueError` naming what is wrong."""
        if model is None:
            return
        if deepspeed:
            prepare_for_deepspeed(model)
        # Under gradient accumulation every micro-batch of a step shares one folded W R (W and R do not change
        # between them); with one forward per step there is nothing to share, and the fold is better freed early.
        for d in decorrelation_modules(model):
            d.reuse_fold_in_training = gradient_accumulation_steps > 1
        if model is self._checked_model:
            return
        decorrelated = bool(decorrelation_matrices(model)) or decorrelation_config_of(model) is not None
        if decorrelated and self.decorrelation_config is not None:
            raise ValueError("decorrelation_config is for plain models; a decorrelated model uses its own config")
        if not decorrelated and self.decorrelation_config is None:
            raise ValueError(
                f"{type(model).__name__} has no R and no DecorrelationConfig: decorrelate it first "
                "(hf_dbp.decorrelate(model, config)), or pass decorrelation_config=hf_dbp.DecorrelationConfig(...) to "
                "measure a plain model's decorrelation loss"
            )
        if decorrelated and decorrelation_matrices(model) and decorrelation_config_of(model) is None:
            raise ValueError(
                f"{type(model).__name__} holds decorrelation matrices but no DecorrelationConfig; decorrelate it with "
                "hf_dbp.decorrelate"
            )
        if not decorrelated and self.decorrelation_config.groups is None:
            # The layers a DBP run would decorrelate, found now: a model without defaults is refused before training.
            groups = plan_decorrelation(model, self.decorrelation_config)
            self.decorrelation_config = self.decorrelation_config.replace(groups=groups)
        for R in decorrelation_matrices(model):
            R.requires_grad_(False)
        if optimizer is not None:
            if dropped := drop_decorrelation_matrices(optimizer, model):
                logger.warning(
                    "Removed %d decorrelation matrices R from the optimizer: R is updated by the decorrelation step, "
                    "never by an optimizer.",
                    dropped,
                )
        self._checked_model = model

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.prepare(model, optimizer, args.gradient_accumulation_steps, _uses_deepspeed(args))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.prepare(model, gradient_accumulation_steps=args.gradient_accumulation_steps)
        # Trainer may have loaded a checkpoint into the shards of an FSDP or DeepSpeed model, behind the modules' back.
        clear_folded_weights(model)
        decorrelated = self.decorrelation_config is None
        self.hook = DecorrelationHook(
            model,
            lr_scheduler=lr_scheduler,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            measure_only=None if decorrelated else self.decorrelation_config,
            **self.options,
        )
        self.hook.attach(optimizer)
        # Under gradient accumulation, W's gradient from each reused fold is mapped once per step, not per micro-batch.
        defer_weight_gradients(model, _last_micro_batch_signal(args, model))
        self.hook.optimizer_steps = state.global_step  # a resumed run goes on counting (R every k steps)
        if state.global_step > 0:
            self.load_state(
                self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            )
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.overlap and world > 1 and not args.fp16:
            from accelerate.state import GradientState

            gradient_state = GradientState()

            def begin_after_last_forward(module, inputs, outputs):
                # After the forward of a step's last micro-batch every statistic of the step exists: their exchange
                # starts now and runs during the backward and the optimizer step (hf_dbp.core.collectives).
                if module.training and gradient_state.sync_gradients:
                    self.hook.begin()

            self._forward_hook = model.register_forward_hook(begin_after_last_forward)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.hook is None or logs is None or "loss" not in logs:
            return
        values = {"decorrelation_skipped_updates": self.hook.skipped_updates()}
        loss = self.hook.mean_loss()
        if loss is not None:
            values["decorrelation_loss"] = loss
        _update_log_record(state, logs, values)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.hook is not None and os.path.isdir(folder):
            self.save_state(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            clear_folded_weights(model)  # after Trainer's load of the best model (load_best_model_at_end)
            defer_weight_gradients(model, None)  # a later loop of the user's gives W its gradient at every backward
        if self.hook is None:
            return
        if self.hook.monitor is None:
            check_same_on_every_process(self.hook.modules())
        self.hook.remove()
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def save_state(self, folder: str) -> None:
        """Write this process's DBP state (`DecorrelationHook.state_dict`) into the checkpoint `folder`, unless there."""
        path = os.path.join(folder, self.STATE_FILE.format(_process_index()))
        if not os.path.isfile(path):
            state = self.hook.state_dict()
            del state["optimizer_steps"]  # the trainer state's global_step
            torch.save(state, path)

    def load_state(self, folder: str) -> None:
        path = os.path.join(folder, self.STATE_FILE.format(_process_index()))
        if not os.path.isfile(path):
            logger.warning(
                "%s holds no DBP state (%s): the rows of R's statistics are drawn afresh, so the resumed run differs "
                "from an uninterrupted one in them",
                folder,
                os.path.basename(path),
            )
            return
        saved = torch.load(path)
        if isinstance(saved, list):  # hf-dbp 0.1 saved the row samplers' states alone
            saved = {"row_samplers": saved}
        try:
            self.hook.load_state_dict({**saved, "optimizer_steps": self.hook.optimizer_steps})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def check_same_on_every_process(modules) -> None:
    """Check that every R is bitwise the same on every process (raises `RuntimeError` if not).

    DBP keeps R out of DDP's reach (it is not a gradient parameter and not a buffer) and updates it from statistics
    summed over all processes; this verifies the result.
    """
    if not modules or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    flat = torch.cat([d.R.detach().flatten().double() for d in modules])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    signature = [float(x) for x in torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()])]
    gathered = _gather(signature)
    if any(s != gathered[0] for s in gathered):
        raise RuntimeError(f"the decorrelation matrices differ between processes: signatures {gathered}")
    logger.info("R identical on all %d processes (%d matrices)", len(gathered), len(modules))


class TrainingClockCallback(TrainerCallback):
    """`train_seconds` (wall-clock seconds since training began, evaluation not counted) in every training log
    record, and a time budget: training stops after `max_train_minutes` of it (with a last evaluation), as
    `max_steps` stops it after so many steps. A resumed run's clock goes on from `carried_seconds`.

    The Trainer must report its evaluations (`evaluation_started`, `evaluation_ended`), as `DBPTrainer.evaluate` does.
    """

    def __init__(self, max_train_minutes: float | None = None) -> None:
        self.max_train_minutes = max_train_minutes
        self.carried_seconds = 0.0
        self._start: float | None = None
        self._in_evaluation = 0.0
        self._evaluation_start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter() - self.carried_seconds
        self._in_evaluation = 0.0

    def evaluation_started(self) -> None:
        self._evaluation_start = time.perf_counter()

    def evaluation_ended(self) -> None:
        if self._evaluation_start is not None:
            self._in_evaluation += time.perf_counter() - self._evaluation_start
            self._evaluation_start = None

    def train_seconds(self) -> float | None:
        """Training seconds so far (None before training began)."""
        if self._start is None:
            return None
        now = time.perf_counter()
        evaluating = now - self._evaluation_start if self._evaluation_start is not None else 0.0
        return now - self._start - self._in_evaluation - evaluating

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_train_minutes is not None and self.train_seconds() >= 60 * self.max_train_minutes:
            control.should_training_stop = True
            control.should_evaluate = args.eval_strategy != "no"  # the last point of the curve

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._start is not None and logs is not None and "train_runtime" not in logs:
            _update_log_record(state, logs, {"train_seconds": self.train_seconds()})


class EmissionsCallback(TrainerCallback):
    """Energy and CO2 of the run with codecarbon's offline tracker, one per machine on its main process (see
    `hf_dbp.training.emissions`): `energy_kwh` and `emissions_g` (cumulative, grams) in every log record, and
    `emissions.csv` in `output_dir`. A resumed run goes on from `carried_machines` (a checkpoint's run totals).

    Args:
        country (`str`, *optional*): ISO 3166-1 alpha-3 code of the country the machines are in (checked now; see
            `resolve_country` for the other ways to give it).
    """

    def __init__(self, country: str | None = None) -> None:
        self.country = resolve_country(country)[0]
        self.carried_machines: list[dict] = []
        self.meter: EmissionsMeter | None = None
        self.last: EmissionsReport | None = None
        self.total: EmissionsReport | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.meter is not None:
            return
        from accelerate import PartialState

        process = PartialState()
        # Machine k: the k-th local main process in rank order, the order the checkpoints list the machines in.
        mains = _gather(process.is_local_main_process)
        machine, num_machines = sum(mains[: process.process_index]), sum(mains)
        carried = carried_for_machine(self.carried_machines, machine, num_machines)
        self.meter = EmissionsMeter(
            args.output_dir,
            self.country,
            process.is_local_main_process,
            machine=machine,
            num_machines=num_machines,
            carried=carried,
        )
        self.meter.start()

    def read(self) -> EmissionsReport | None:
        """The figures of all machines so far (every process must call it together)."""
        if self.meter is not None:
            self.last = self.meter.read(gather=_gather)
        return self.last

    def machines(self) -> list[dict]:
        """Every machine's cumulative figures, for a checkpoint's run totals (every process must call it together)."""
        if self.meter is None:
            return []
        self.read()
        return [state for state in _gather(self.meter.state) if state is not None]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.meter is not None and logs is not None and "train_runtime" not in logs:
            report = self.read()
            _update_log_record(state, logs, {"energy_kwh": report.energy_kwh, "emissions_g": report.emissions_g})

    def on_train_end(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.total = self.meter.read(stop=True, gather=_gather)


__all__ = [
    "DecorrelationCallback",
    "EmissionsCallback",
    "TrainingClockCallback",
    "check_same_on_every_process",
]
