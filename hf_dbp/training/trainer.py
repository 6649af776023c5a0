"""`DBPTrainer`: `transformers.Trainer` with DBP's callbacks, whole checkpoints, and model cards that carry emissions."""

from __future__ import annotations

import inspect
import logging
import math
import os

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

from ..core.config import DecorrelationConfig
from ..core.model import decorrelation_config_of, from_pretrained_checked, is_decorrelated, load_decorrelated
from .callbacks import DecorrelationCallback, EmissionsCallback, TrainingClockCallback
from .checkpoints import resolve_checkpoint, rotate_whole_checkpoints, save_whole_checkpoint
from .emissions import read_run_totals, write_run_totals
from .model_card import write_model_card
from .optimizers import matrices_with_adamw
from .training_args import dbp_argument, schedule_warnings

logger = logging.getLogger(__name__)


class DBPTrainer(Trainer):
    """
    [`~transformers.Trainer`] for DBP: the Trainer with three callbacks and whole checkpoints.

    - [`DecorrelationCallback`]: the decorrelation step of every R after each optimizer step that was not skipped, and
      `decorrelation_loss` in every training log record. Given a plain model (the BP baseline) and a
      `decorrelation_config`, it measures the same loss without changing the model, so BP and DBP runs compare.
    - [`TrainingClockCallback`]: `train_seconds` (wall-clock seconds since training began, evaluation not counted) in
      every record, and `max_train_minutes`.
    - [`EmissionsCallback`]: energy and emissions with codecarbon's offline tracker (`energy_kwh`, `emissions_g` in
      the records, `emissions.csv` in `output_dir`, `train_energy_kwh` and `train_emissions_g` in the train metrics).

    Every saved folder gets a model card (`README.md`) with the run's emissions, settings and results (see
    `hf_dbp.training.model_card`). A checkpoint appears under its name only once every file of it is written (see
    `hf_dbp.training.checkpoints`), with `run_totals.json` (every machine's figures and the training seconds so far),
    so a run resumed from it reports what an uninterrupted run would.

    It trains any model that holds decorrelated layers: a model of any family passed through `hf_dbp.decorrelate`, a
    ViTMAE-DBP model, or a model that contains one (e.g. an UperNet whose backbone kept its R). Every setting is a
    field of [`DBPTrainingArguments`] (plain `TrainingArguments` take their defaults).

    Args:
        decorrelation_config ([`DecorrelationConfig`], *optional*):
            For a plain model only: which layers to measure, the sample fraction and the kappa of the loss.
        model_card_kwargs (`dict`, *optional*): `datasets`, `base_model`, `model_name` for the model cards.
        *args, **kwargs: passed to [`~transformers.Trainer`].
    """

    def __init__(
        self,
        *args,
        decorrelation_config: DecorrelationConfig | None = None,
        model_card_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        # The country first: a wrong one stops the run before anything happens (Trainer creates output_dir).
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None) or TrainingArguments()
        track = dbp_argument(training_args, "track_emissions")
        country = dbp_argument(training_args, "emissions_country")
        self.emissions_callback = EmissionsCallback(country) if track else None
        super().__init__(*args, **kwargs)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            # accelerate launch with an FSDP config file on a machine without GPUs: accelerate (1.16) enables FSDP for
            # GPU-like devices only and quietly trains without it (with use_cpu, DDP over gloo).
            logger.warning(
                "accelerate was given an FSDP config, but this run is not sharded (%s): accelerate runs FSDP on GPUs "
                "only",
                self.accelerator.distributed_type,
            )
        self._card_kwargs = dict(model_card_kwargs or {})
        # Put ahead of the other callbacks, so that what they add to a log record reaches the console and every
        # report_to integration.
        if decorrelation_config is None and not is_decorrelated(self.model):
            decorrelation_config = DecorrelationConfig()  # the BP baseline: measured on its architecture's defaults
        self.decorrelation_callback = DecorrelationCallback.from_args(self.args, decorrelation_config)
        self.decorrelation_callback.prepare(
            self.model, self.optimizer, self.args.gradient_accumulation_steps, self.is_deepspeed_enabled
        )
        self.clock = TrainingClockCallback(dbp_argument(self.args, "max_train_minutes"))
        ours = [self.decorrelation_callback, self.clock] + (
            [self.emissions_callback] if self.emissions_callback else []
        )
        self.callback_handler.callbacks[:0] = ours
        self.emissions = None  # the run's total once training ended
        self.resumed_from: str | None = None  # the checkpoint the last train() resumed from
        self.resumed_at_step = 0  # its step (0 for a fresh run)
        self.steps_trained = 0  # the optimizer steps the last train() ran
        self.train_runtime: float | None = None
        self._carried_loss_sum: float | None = 0.0
        self._carried_loss: dict = {}
        self.callback_handler.add_callback(_CarryTrainLoss(self))
        self._staging_output_dir: str | None = None  # where a checkpoint is written before it is whole
        # ViTMAE returns its loss without labels; this is Trainer's switch for such models (eval_loss is computed).
        if "labels" not in inspect.signature(self.accelerator.unwrap_model(self.model).forward).parameters:
            self.can_return_loss = True

    def create_optimizer(self, model=None):
        # Muon or SOAP on the hidden matrices (DBPTrainingArguments.matrix_optimizer), AdamW on the rest.
        matrix_optimizer = dbp_argument(self.args, "matrix_optimizer")
        if self.optimizer is None and matrix_optimizer != "adamw":
            opt_model = self.model if model is None else model
            self.optimizer = matrices_with_adamw(
                opt_model,
                matrix_optimizer,
                self.args.learning_rate,
                self.args.weight_decay,
                self.get_decay_parameter_names(opt_model),
                adam_betas=(self.args.adam_beta1, self.args.adam_beta2),
                adam_epsilon=self.args.adam_epsilon,
                muon_lr_multiplier=dbp_argument(self.args, "muon_lr_multiplier"),
            )
            return self.optimizer
        return super().create_optimizer(model)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, resuming from a whole checkpoint only (see `hf_dbp.training.checkpoints`):
        `resume_from_checkpoint` a path (refused with the reason when it is not whole) or `True` (the newest whole
        checkpoint in `output_dir`, if any). Before training it warns of settings that do not fit the run's length
        (`schedule_warnings`) and says when there is nothing left to train. The train metrics' `train_loss` is the
        mean over all the run's steps, as an uninterrupted run reports it, also when resumed (the checkpoint carries
        the sum); `resumed_from`, `resumed_at_step` and `steps_trained` say what this call did."""
        checkpoint = resolve_checkpoint(
            self.args.output_dir, resume_from_checkpoint, not self.args.save_only_model, clean_up=self.args.should_save
        )
        if checkpoint and resume_from_checkpoint is True and self.args.should_save:
            # A run killed after saving its newest checkpoint and before deleting the oldest (save_total_limit)
            # deletes it now: a resumed run keeps the checkpoints an uninterrupted one would.
            best = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).best_model_checkpoint
            rotate_whole_checkpoints(self.args.output_dir, self.args.save_total_limit, checkpoint, best)
        totals = read_run_totals(checkpoint) if checkpoint else None
        start = _global_step(checkpoint) if checkpoint else 0
        planned = self.planned_steps()
        if self.is_world_process_zero():
            for warning in schedule_warnings(self.args, planned):
                logger.warning(warning)
        if checkpoint and planned is not None and start >= planned:
            logger.warning(
                "Nothing to train: %s is already at %s %d; the run saves the model, evaluates and writes "
                "its card only",
                os.path.basename(checkpoint),
                "max_steps" if self.args.max_steps > 0 else "the end of its epochs, step",
                planned,
            )
        self.resumed_from, self.resumed_at_step, self.steps_trained = checkpoint, start, 0
        # The train loss of the steps before the checkpoint: carried, so that train_loss covers the whole run.
        self._carried_loss = (
            {} if not checkpoint else {k: v for k, v in (totals or {}).items() if k.startswith("train_loss")}
        )
        self._carried_loss_sum = 0.0 if not checkpoint else self._carried_loss.get("train_loss_sum")
        if checkpoint and self._carried_loss_sum is None:
            logger.warning(
                "%s holds no train loss total (saved by an older hf-dbp or another Trainer): train_loss "
                "covers the steps after it only",
                checkpoint,
            )
        if checkpoint and totals is None:
            logger.warning(
                "%s has no run_totals.json: energy, emissions and train_seconds count from this resume on only",
                checkpoint,
            )
        elif checkpoint and self.emissions_callback is not None and not totals.get("machines"):
            logger.warning("%s was saved without measuring emissions: they count from this resume on only", checkpoint)
        every = dbp_argument(self.args, "decorrelation_update_every")
        if checkpoint and every > 1 and _global_step(checkpoint) % every:
            # The statistics gathered since the last update live in the modules, not in checkpoints.
            logger.warning(
                "%s was saved between two decorrelation updates (every %d steps): the statistics gathered "
                "since the last one are not in it, so the next update sees fewer steps",
                checkpoint,
                every,
            )
        self.clock.carried_seconds = (totals or {}).get("train_seconds") or 0.0
        if self.emissions_callback is not None:
            self.emissions_callback.carried_machines = (totals or {}).get("machines") or []
        self.decorrelation_callback.resume_from = checkpoint
        result = super().train(checkpoint or None, *args, **kwargs)
        self.steps_trained = self.state.global_step - start
        self.train_runtime = result.metrics.get("train_runtime")
        if self.emissions_callback is not None and self.emissions_callback.total is not None:
            self.emissions = self.emissions_callback.total
            result.metrics.update(
                train_energy_kwh=self.emissions.energy_kwh, train_emissions_g=self.emissions.emissions_g
            )
        return TrainOutput(result.global_step, result.metrics.get("train_loss", float("nan")), result.metrics)

    def _run_epoch(self, *args, **kwargs):
        # Overridden (private): Trainer's epoch runs one optimizer step before it checks max_steps, so a run resumed
        # from a checkpoint at max_steps (one killed after its last save) would train a step beyond it, when the
        # steps do not fill whole epochs. Such a run has nothing to train.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            return None
        return super()._run_epoch(*args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "train_loss" in logs and "train_runtime" in logs:
            # The end-of-training record (the train metrics themselves: fixed in place): Trainer divides the loss of
            # this call's steps by their number; with the checkpoint's sum carried in, the run's mean is over all.
            if self._carried_loss_sum is not None and self.state.global_step > 0:
                logs["train_loss"] = self._total_loss_scalar / self.state.global_step
            elif self.state.global_step == self.resumed_at_step:
                del logs["train_loss"]  # no step trained and no total carried: there is no train loss to report
        super().log(logs, *args, **kwargs)

    def planned_steps(self) -> int | None:
        """The optimizer steps of the whole run: `max_steps`, else the epochs' (None for a dataset without length)."""
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        try:
            examples = len(self.train_dataset)
        except TypeError:
            return None
        per_batch = self._train_batch_size * args.world_size
        batches = examples // per_batch if args.dataloader_drop_last else math.ceil(examples / per_batch)
        accumulation = args.gradient_accumulation_steps
        per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
        return math.ceil(args.num_train_epochs * per_epoch)

    def training_summary(self) -> str:
        """What the last `train()` did, for a run's last log line: its steps and train loss, saying which steps were
        carried from a checkpoint, or that there was nothing to train."""
        step, start = self.state.global_step, self.resumed_at_step
        name = os.path.basename(self.resumed_from) if self.resumed_from else None
        loss = next((r["train_loss"] for r in reversed(self.state.log_history) if "train_loss" in r), None)
        if name is not None and self.steps_trained == 0:
            return (
                f"nothing to train: {name} is already at max_steps {self.state.max_steps}"
                if start == self.state.max_steps
                else f"nothing to train: {name} is at step {start}, past max_steps {self.state.max_steps}"
            )
        runtime = f" in {self.train_runtime:.1f} s" if self.train_runtime is not None else ""
        if name is None:
            return f"{step} steps{runtime}, train loss {loss:.4f}" if loss is not None else f"{step} steps{runtime}"
        text = f"{step} steps, {self.steps_trained} of them in this run (steps {start + 1}-{step}{runtime}, resumed from {name})"
        if loss is None:
            return text
        if self._carried_loss_sum is not None:
            return f"{text}; train loss {loss:.4f} over all {step} (that of steps 1-{start} carried from {name})"
        return f"{text}; train loss {loss:.4f} over steps {start + 1}-{step} only ({name} holds no earlier total)"

    def carried_note(self, step: int) -> str:
        """`" (step N, carried from checkpoint-M)"` for a figure logged at `step` before this run resumed, else ""."""
        if self.resumed_from and step <= self.resumed_at_step:
            return f" (logged at step {step}, carried from {os.path.basename(self.resumed_from)})"
        return ""

    def _save_checkpoint(self, model, trial) -> None:
        # Overridden (private) for whole checkpoints: Trainer writes a checkpoint folder in place, so a run killed
        # while saving leaves a partial one that the next run resumes from and fails on. Here every file (Trainer's,
        # run_totals.json, the DBP state, the card) goes into a staging folder first, renamed once complete.
        machines = self.emissions_callback.machines() if self.emissions_callback is not None else []

        loss = self._train_loss_state()

        def write_ours(folder: str) -> None:
            self.decorrelation_callback.save_state(folder)
            if self.args.should_save:
                write_run_totals(folder, machines, self.clock.train_seconds(), loss)

        save_whole_checkpoint(self, model, trial, super()._save_checkpoint, write_ours)

    def _train_loss_state(self) -> dict | None:
        """Trainer's train-loss accounting now, for `run_totals.json`: the total of the logged losses
        (`train_loss_sum`), each process's sum of the losses not logged yet (`train_loss_unlogged`, float32 as Trainer
        keeps it) and the step last logged. A run resumed from it logs and reports exactly what an uninterrupted run
        does. None when the total is not known (resumed from a checkpoint without it)."""
        if self._carried_loss_sum is None or not hasattr(self, "_total_loss_scalar"):
            return None
        unlogged = []
        if self.state.global_step > self._globalstep_last_logged:  # the same on every process: all gather or none
            unlogged = self.accelerator.gather(self._tr_loss.detach().reshape(1)).tolist()
        return {
            "train_loss_sum": self._total_loss_scalar,
            "train_loss_unlogged": unlogged,
            "train_loss_logged_step": self._globalstep_last_logged,
        }

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Overridden (private): Trainer pushes from inside its save, here the staging folder, which lacks DBP's files
        # yet and is renamed a moment later (the upload runs in the background). The push waits for the whole
        # checkpoint: save_whole_checkpoint calls this again with the final folder.
        if self._staging_output_dir is None:
            super()._push_from_checkpoint(checkpoint_folder)

    def _get_output_dir(self, trial) -> str:
        # Overridden (private): while a checkpoint is saved, Trainer writes it into the staging folder.
        return self._staging_output_dir or super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Overridden (private): Trainer reloads with `load_state_dict(file_keys, strict=False)`, but `save_pretrained`
        # writes ViTMAE in transformers' 4.x key layout (`vit.encoder.layer.N...`), so the encoder's weights and every
        # R would silently keep their current values. `from_pretrained` converts the keys and checks them all.
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or model not in (None, self.model, self.model_wrapped):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_weights_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # Overridden (private) for the same reason as `_load_from_checkpoint`.
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info(
            "Loading the best model from %s (score: %s)", self.state.best_model_checkpoint, self.state.best_metric
        )
        self._load_weights_from(self.state.best_model_checkpoint)

    def _load_weights_from(self, folder: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if decorrelation_config_of(model) is not None:
            loaded = load_decorrelated(type(model), folder, config=model.config)  # rebuilds every R
        else:
            loaded = from_pretrained_checked(type(model), folder, config=model.config)
        model.load_state_dict(loaded.state_dict(), strict=True)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Without compute_metrics (MAE pre-training) evaluation is the loss alone: gathering the reconstructed patches
        # as well would hold a whole evaluation set of them in memory.
        loss_only = prediction_loss_only or self.compute_metrics is None
        return super().prediction_step(model, inputs, loss_only, ignore_keys=ignore_keys)

    def evaluate(self, *args, **kwargs):
        self.clock.evaluation_started()  # evaluation is not training time
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.clock.evaluation_ended()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            self._write_card(output_dir or self.args.output_dir)

    def _write_card(self, folder: str) -> str:
        own_files = os.path.abspath(folder) == os.path.abspath(self.args.output_dir)
        # The run's folder: its all_results.json, and the total of all machines once training ended (the sum of the
        # last rows of their csv files, also where the machines do not share the folder), else its own csv files.
        # A checkpoint: the figures so far.
        last = self.emissions_callback.last if self.emissions_callback is not None else None
        emissions = self.emissions if own_files else (self.emissions or last)
        evaluations = {k: v for r in self.state.log_history for k, v in r.items() if k.startswith("eval_")}
        return write_model_card(
            folder,
            self.accelerator.unwrap_model(self.model).config,
            emissions=emissions,
            results=None if own_files else evaluations,
            training_seconds=self.clock.train_seconds(),
            steps=self.state.global_step,
            **self._card_kwargs,
        )

    def create_model_card(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
        tags=None,
        **kwargs,
    ) -> None:
        """Write hf-dbp's model card (emissions, DBP settings, results) instead of Trainer's generic one."""
        if model_name is not None:
            # Trainer.push_to_hub passes the repo's name without its owner; the card's loading code needs the repo id.
            repo_id = self.hub_model_id or self.args.hub_model_id
            if repo_id and repo_id.split("/")[-1] == model_name:
                model_name = repo_id
            self._card_kwargs["model_name"] = model_name
        if finetuned_from is not None:
            self._card_kwargs["base_model"] = finetuned_from
        if dataset is not None:
            self._card_kwargs["datasets"] = [dataset] if isinstance(dataset, str) else list(dataset)
        if tags:
            self._card_kwargs["extra_tags"] = [tags] if isinstance(tags, str) else list(tags)
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir)


class _CarryTrainLoss(TrainerCallback):
    """Starts Trainer's train-loss total (reset just before `on_train_begin`) at the sum a resumed checkpoint carries,
    so that the run's totals add up in the same order as an uninterrupted run's."""

    def __init__(self, trainer: DBPTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, carried = self.trainer, self.trainer._carried_loss
        if trainer._carried_loss_sum:
            trainer._total_loss_scalar = trainer._carried_loss_sum
        unlogged = carried.get("train_loss_unlogged") or []
        if unlogged and len(unlogged) == args.world_size:
            # The steps since the last log, trained before the checkpoint: the next log covers them too, as it would
            # have without the interruption.
            value = torch.tensor(
                unlogged[args.process_index], dtype=trainer._tr_loss.dtype, device=trainer._tr_loss.device
            )
            trainer._tr_loss += value
            trainer._globalstep_last_logged = carried.get("train_loss_logged_step", state.global_step)
        elif unlogged:  # saved on another number of processes: their mean joins the total, the next log is new steps'
            trainer._total_loss_scalar += sum(unlogged) / len(unlogged)


def _global_step(checkpoint: str) -> int:
    path = os.path.join(checkpoint, "trainer_state.json")
    return TrainerState.load_from_json(path).global_step if os.path.isfile(path) else 0


__all__ = ["DBPTrainer"]
