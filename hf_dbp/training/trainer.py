"""A `transformers.Trainer` that takes the decorrelation step after each optimizer step."""

from __future__ import annotations

import inspect
import logging
import os
import time

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEForPreTraining, ViTMAEModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..core.config import CONFIG_ATTRIBUTE, DecorrelationConfig
from ..core.decorrelation import (
    Decorrelation,
    DecorrelationMonitor,
    PendingStatistics,
    RowSampler,
    begin_decorrelation_step,
    decorrelation_matrices,
    decorrelation_step,
    drop_decorrelation_matrices,
)
from ..core.model import decorrelation_config_of, decorrelation_modules, load_decorrelated, plan_decorrelation
from ..models.vit_mae_dbp.configuration_vit_mae_dbp import ViTMAEDBPConfig
from ..models.vit_mae_dbp.modeling_vit_mae_dbp import (
    STATISTICS_SEED,
    ViTMAEDBPPreTrainedModel,
    vit_mae_decorrelation_groups,
)
from .emissions import (
    EmissionsMeter,
    EmissionsReport,
    carried_for_machine,
    read_run_totals,
    resolve_country,
    write_run_totals,
)
from .model_card import write_model_card
from .optimizers import matrices_with_adamw

logger = logging.getLogger(__name__)


class _DecorrelationCallback(TrainerCallback):
    """Runs the trainer's decorrelation step on `on_optimizer_step`, which fires once per real optimizer step (after
    gradient accumulation) on every process: the step's all-reduce needs every process to take part."""

    def __init__(self, trainer: DBPTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._training_clock_start()
        self.trainer._start_emissions()

    def on_step_end(self, args, state, control, **kwargs):
        budget = getattr(args, "max_train_minutes", None)
        if budget is not None and self.trainer._train_seconds() >= 60 * budget:
            control.should_training_stop = True  # a budget in time, as max_steps is one in steps
            control.should_evaluate = args.eval_strategy != "no"  # the last point of the curve

    def on_optimizer_step(self, args, state, control, **kwargs):
        # A step skipped by the fp16 grad scaler changed no weight; its statistics stay for the next step.
        if not self.trainer.accelerator.optimizer_step_was_skipped:
            self.trainer._decorrelation_update()


class DBPTrainer(Trainer):
    """
    [`~transformers.Trainer`] for DBP: after each optimizer step that was not skipped it takes the decorrelation step
    of every R in the model (`hf_dbp.decorrelation_step`), and it adds to every training log record

    - `decorrelation_loss`: the decorrelation loss averaged over the optimizer steps since the last record, and
    - `train_seconds`: wall-clock seconds since training began, not counting evaluation,

    so runs can be compared against time and against steps (`trainer.state.log_history`, `trainer_state.json`).

    It trains any model that holds decorrelated layers: a transformers model of any family passed through
    `hf_dbp.decorrelate` (its `config.decorrelation` gives the step's settings), a `ViTMAEDBP` model (its
    `decorrelation_*` config fields), or a model that contains one, e.g. an `UperNetForSemanticSegmentation` whose
    backbone kept its R (see `upernet_from_pretraining_checkpoint`).

    Given a plain model (the BP baseline), it measures the decorrelation loss of the layers a DBP run would
    decorrelate, without changing the model, so BP and DBP runs report comparable figures: for a plain
    [`~transformers.ViTMAEForPreTraining`] or [`~transformers.ViTMAEModel`] those of a `ViTMAEDBPConfig`, for any
    other model those `decorrelation_config` (a `DecorrelationConfig`) selects.

    It also measures the run's energy and emissions with codecarbon's offline tracker (one per machine, on its main
    process): `energy_kwh` and `emissions_g` (cumulative, grams) join the log records, `emissions.csv` lands in
    `output_dir` (`emissions_machine<k>.csv` for each of several machines), the totals join the train metrics
    (`train_energy_kwh`, `train_emissions_g`), and every saved folder gets a model card (`README.md`) that carries
    them (see `hf_dbp.training.model_card`). Each checkpoint keeps every machine's figures and the training seconds so far
    (`run_totals.json`): a run resumed from it goes on from them, so its figures are those of an uninterrupted run.

    Args:
        decorrelation_config ([`DecorrelationConfig`] or [`ViTMAEDBPConfig`], *optional*):
            For a plain model only: which layers to measure, the sample fraction and the kappa of the loss. Defaults
            to `ViTMAEDBPConfig()` for a plain ViTMAE and to `DecorrelationConfig()` (the architecture's default
            targets) for any other model. A decorrelated model uses its own config.
        emissions_country (`str`, *optional*):
            ISO 3166-1 alpha-3 code of the country the machines are in; see `hf_dbp.training.emissions.resolve_country`
            for the other ways to give it. Checked before training.
        track_emissions (`bool`, defaults to `True`): measure energy and emissions.
        model_card_kwargs (`dict`, *optional*): `datasets`, `base_model`, `model_name` for the model cards.
        decorrelation_guard (`str`, defaults to `"skip"`): what to do with an update of R that would make it
            non-finite or comes from exploding statistics (loss above `decorrelation_max_loss`): `"skip"` it (R
            stays, a warning is logged and `decorrelation_skipped_updates` counts it in the logs) or `"stop"` the run
            with an error.
        decorrelation_max_loss (`float`, defaults to 1e6): the decorrelation loss taken as exploded.
        *args, **kwargs: passed to [`~transformers.Trainer`].
    """

    train_began: bool = False
    """Whether any DBPTrainer of this process has begun `train` (see `hf_dbp.tasks.scripts.run_main`)."""

    def __init__(
        self,
        *args,
        decorrelation_config: ViTMAEDBPConfig | None = None,
        emissions_country: str | None = None,
        track_emissions: bool = True,
        model_card_kwargs: dict | None = None,
        decorrelation_guard: str = "skip",
        decorrelation_max_loss: float = 1e6,
        **kwargs,
    ) -> None:
        if decorrelation_guard not in ("skip", "stop"):
            raise ValueError(f"decorrelation_guard must be 'skip' or 'stop', got {decorrelation_guard!r}")
        self._guard = {"on_divergence": "raise" if decorrelation_guard == "stop" else "skip",
                       "max_loss": decorrelation_max_loss}  # fmt: skip
        self._skipped_reported = 0
        # Checked first: a wrong country must stop the run before anything else happens.
        self._country = resolve_country(emissions_country)[0] if track_emissions else None
        self._track_emissions = track_emissions
        self._meter: EmissionsMeter | None = None
        self.emissions: EmissionsReport | None = None
        self._last_emissions: EmissionsReport | None = None
        self._card_kwargs = dict(model_card_kwargs or {})
        super().__init__(*args, **kwargs)
        self._monitor: DecorrelationMonitor | None = None
        # A ViTMAEDBP model (or a model holding one, e.g. UperNet's backbone) is trained as DBP whatever R it has: a
        # backbone from a BP checkpoint has none, and measures nothing.
        self._decorrelated = bool(decorrelation_modules(self.model)) or any(
            isinstance(m, ViTMAEDBPPreTrainedModel) for m in self.model.modules()
        )
        if self._decorrelated:
            if decorrelation_config is not None:
                raise ValueError("decorrelation_config is for plain models; a DBP model uses its own config")
            if decorrelation_config_of(self.model) is None:
                raise ValueError(f"{type(self.model).__name__} holds decorrelation matrices but no DecorrelationConfig "
                                 "(config.decorrelation); decorrelate it with hf_dbp.decorrelate")  # fmt: skip
        else:
            self._monitor, self._kappa = self._baseline_monitor(self.model, decorrelation_config)
        self._freeze_decorrelation_matrices()  # before DDP wraps the model: it must not expect gradients for R
        if self.optimizer is not None and (dropped := drop_decorrelation_matrices(self.optimizer, self.model)):
            logger.warning("Removed %d decorrelation matrices R from the optimizer passed to DBPTrainer: R is updated "
                           "by the decorrelation step, never by an optimizer.", dropped)  # fmt: skip
        # Under gradient accumulation every micro-batch of a step shares one folded W R (W and R do not change
        # between them); with one forward per step there is nothing to share, and the fold is better freed early.
        for d in self._decorrelation_modules():
            d.reuse_fold_in_training = self.args.gradient_accumulation_steps > 1
        # ViTMAE returns its loss without labels; this is Trainer's switch for such models (eval_loss is computed).
        if "labels" not in inspect.signature(self.accelerator.unwrap_model(self.model).forward).parameters:
            self.can_return_loss = True
        self._decorrelation_losses: list[float] = []
        self._pending_statistics: PendingStatistics | None = None
        self._clock_start: float | None = None
        self._seconds_in_evaluation = 0.0
        self._evaluation_start: float | None = None
        self._resumed_totals: dict | None = None  # the run_totals.json of the checkpoint train() resumes from
        self.add_callback(_DecorrelationCallback(self))

    @staticmethod
    def _baseline_monitor(model, settings: DecorrelationConfig | ViTMAEDBPConfig | None):
        """The monitor that measures a plain model's decorrelation loss (the BP baseline) without changing it."""
        if isinstance(model, (ViTMAEForPreTraining, ViTMAEModel)) and not isinstance(settings, DecorrelationConfig):
            # ViTMAE: the layers of ViTMAEDBPConfig.decorrelation_layers, exactly those a DBP-MAE decorrelates.
            settings = settings or ViTMAEDBPConfig()
            encoder = model.vit if isinstance(model, ViTMAEForPreTraining) else model
            groups = vit_mae_decorrelation_groups(model.config.num_hidden_layers, settings.decorrelation_layers)
            # Its own generator, like a DBP model's: the BP run must draw the same masks as the DBP run.
            sampler = RowSampler(STATISTICS_SEED)
            monitor = DecorrelationMonitor(encoder, groups, settings.decorrelation_sample_fraction, sampler)
            return monitor, settings.decorrelation_kappa
        if isinstance(settings, ViTMAEDBPConfig):
            raise TypeError(f"a ViTMAEDBPConfig describes ViTMAE layers; for a {type(model).__name__} pass "
                            "decorrelation_config=hf_dbp.DecorrelationConfig(...)")  # fmt: skip
        settings = settings or DecorrelationConfig()
        groups = settings.groups or plan_decorrelation(model, settings)
        sampler = RowSampler(settings.seed)
        return DecorrelationMonitor(model, groups, settings.sample_fraction, sampler), settings.kappa

    def _freeze_decorrelation_matrices(self) -> None:
        # Trainer groups the parameters that require grad, and DDP expects a gradient for each. Every assignment of R
        # clears that flag, but a user's `model.requires_grad_(True)` sets it again: clear it whatever happened.
        for R in decorrelation_matrices(self.model):
            R.requires_grad_(False)

    def create_optimizer(self, model=None):
        self._freeze_decorrelation_matrices()
        matrix_optimizer = getattr(self.args, "matrix_optimizer", "adamw")
        if self.optimizer is None and matrix_optimizer != "adamw":
            opt_model = self.model if model is None else model
            self.optimizer = matrices_with_adamw(
                opt_model, matrix_optimizer, self.args.learning_rate, self.args.weight_decay, self.get_decay_parameter_names(opt_model),
                adam_betas=(self.args.adam_beta1, self.args.adam_beta2), adam_epsilon=self.args.adam_epsilon,
                muon_lr_multiplier=self.args.muon_lr_multiplier,
            )  # fmt: skip
            return self.optimizer
        return super().create_optimizer(model)

    def _training_clock_start(self) -> None:
        # A resumed run's clock goes on from its checkpoint's (run_totals.json), as an uninterrupted run's would.
        self._clock_start = time.perf_counter() - ((self._resumed_totals or {}).get("train_seconds") or 0.0)
        self._seconds_in_evaluation = 0.0

    def _start_emissions(self) -> None:
        if self._track_emissions and self._meter is None:
            # Machine k: the k-th local main process in rank order, the order the checkpoints list the machines in.
            mains = self._gather_over_processes(self.accelerator.is_local_main_process)
            machine, num_machines = sum(mains[: self.accelerator.process_index]), sum(mains)
            carried = carried_for_machine((self._resumed_totals or {}).get("machines") or [], machine, num_machines)
            self._meter = EmissionsMeter(self.args.output_dir, self._country, self.accelerator.is_local_main_process,
                                         machine=machine, num_machines=num_machines, carried=carried)  # fmt: skip
            self._meter.start()

    def _gather_over_processes(self, item) -> list:
        """One picklable object from every process, in rank order; every process must call it together."""
        return [item] if self.accelerator.num_processes == 1 else gather_object([item])

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        # In this process a run has begun: from now on an error is the run's, and the example scripts' one-line
        # report of the user's mistakes (hf_dbp.tasks.scripts.run_main) keeps its traceback.
        DBPTrainer.train_began = True
        checkpoint = resume_from_checkpoint
        if checkpoint is True and os.path.isdir(self.args.output_dir):  # as Trainer resolves it (and fails without)
            checkpoint = get_last_checkpoint(self.args.output_dir)
        # What the run resumed from had measured and trained so far (run_totals.json, written by _save_checkpoint).
        self._resumed_totals = read_run_totals(checkpoint) if isinstance(checkpoint, str) else None
        if isinstance(checkpoint, str) and self._resumed_totals is None:
            logger.warning("%s has no run_totals.json: energy, emissions and train_seconds count from this resume on "
                           "only", checkpoint)  # fmt: skip
        elif isinstance(checkpoint, str) and self._track_emissions and not self._resumed_totals.get("machines"):
            logger.warning("%s was saved without measuring emissions: they count from this resume on only", checkpoint)
        every = getattr(self.args, "decorrelation_update_every", 1)
        if isinstance(checkpoint, str) and every > 1 and self._resumed_step(checkpoint) % every:
            # The statistics gathered since the last update live in the modules, not in checkpoints.
            logger.warning("%s was saved between two decorrelation updates (every %d steps): the statistics gathered "
                           "since the last one are not in it, so the next update sees fewer steps", checkpoint, every)
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        self.check_decorrelation_consistency()
        if self._meter is not None:
            self.emissions = self._meter.read(stop=True, gather=self._gather_over_processes)
            result.metrics.update(train_energy_kwh=self.emissions.energy_kwh, train_emissions_g=self.emissions.emissions_g)
        return result

    @staticmethod
    def _resumed_step(checkpoint: str) -> int:
        path = os.path.join(checkpoint, "trainer_state.json")
        return TrainerState.load_from_json(path).global_step if os.path.isfile(path) else 0

    def _load_weights_from(self, folder: str) -> None:
        """Load a saved folder's weights into the model through `from_pretrained`, with all keys checked.

        transformers 5.23's Trainer reloads checkpoints with `model.load_state_dict(file_keys, strict=False)`, but
        `save_pretrained` writes ViTMAE in its 4.x key layout (`vit.encoder.layer.N...`), so the encoder's weights and
        every R would silently keep their current values. `from_pretrained` converts the keys; `load_decorrelated`
        rebuilds the R of a model decorrelated with `hf_dbp.decorrelate`.
        """
        model = self.accelerator.unwrap_model(self.model)
        if self._decorrelated and CONFIG_ATTRIBUTE in model.config.to_dict():
            loaded = load_decorrelated(type(model), folder, config=model.config)
        else:
            loaded = type(model).from_pretrained(folder, config=model.config)
        model.load_state_dict(loaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or model not in (None, self.model, self.model_wrapped):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_weights_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info("Loading the best model from %s (score: %s)", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_weights_from(self.state.best_model_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # After the forward of a step's last micro-batch every statistic of the step exists: over several processes
        # their exchange starts now and runs during the backward and the optimizer step (hf_dbp.core.collectives).
        if model.training and self.accelerator.sync_gradients and self._overlaps_exchange() and self._updates_r_now():
            if modules := self._decorrelation_modules():
                self._pending_statistics = begin_decorrelation_step(modules, transfer_dtype=self._transfer_dtype())
        return result

    def _updates_r_now(self) -> bool:
        """Whether the optimizer step under way (the next one) is followed by a decorrelation update: every
        `decorrelation_update_every`-th. Counted from `global_step`, which a resumed run restores."""
        every = getattr(self.args, "decorrelation_update_every", 1)
        return (self.state.global_step + 1) % every == 0

    def _transfer_dtype(self) -> str:
        return getattr(self.args, "decorrelation_transfer_dtype", "float32")

    def _overlaps_exchange(self) -> bool:
        # Not with fp16's grad scaler: a step it skips keeps its statistics for the next step (on_optimizer_step).
        return (self.accelerator.num_processes > 1 and getattr(self.args, "decorrelation_overlap", True)
                and not self.args.fp16)  # fmt: skip

    def _decorrelation_modules(self) -> list[Decorrelation]:
        if self._monitor is not None:
            return list(self._monitor.decorrelations.values())
        return decorrelation_modules(self.model)

    def _decorrelation_update(self) -> None:
        pending, self._pending_statistics = self._pending_statistics, None
        # Every k-th step updates; the others keep gathering statistics and reform the folded weights.
        common = dict(pending=pending, transfer_dtype=self._transfer_dtype(), update=self._updates_r_now())
        if self._monitor is not None:
            loss = decorrelation_step(self._decorrelation_modules(), lr=0.0, kappa=self._kappa, **common)
        else:
            config = decorrelation_config_of(self.model)  # read at every step: a change of the config applies at once
            loss = decorrelation_step(
                self._decorrelation_modules(), config.lr * self._decorrelation_lr_scale(), config.kappa,
                variance_form=config.variance_form, **common, **self._guard,
            )  # fmt: skip
        if loss is not None:
            self._decorrelation_losses.append(loss)
        skipped = self._skipped_updates()
        if skipped > self._skipped_reported:
            logger.warning("step %d: %d decorrelation update(s) skipped by the guard (R non-finite or loss above %g); "
                           "R left unchanged", self.state.global_step, skipped - self._skipped_reported,
                           self._guard["max_loss"])  # fmt: skip
            self._skipped_reported = skipped

    def _decorrelation_lr_scale(self) -> float:
        """1, or with `decorrelation_lr_schedule="tied"` the factor the weights' scheduler applies at this step (its
        warm-up and decay: the scheduler steps after this callback, so this is the factor the step just used)."""
        if getattr(self.args, "decorrelation_lr_schedule", "constant") != "tied" or self.lr_scheduler is None:
            return 1.0
        base, last = self.lr_scheduler.base_lrs[0], self.lr_scheduler.get_last_lr()[0]
        return last / base if base else 1.0

    def check_decorrelation_consistency(self) -> None:
        """Check that every R is bitwise the same on every process (raises `RuntimeError` if not).

        DBP keeps R out of DDP's reach (it is not a gradient parameter and not a buffer) and updates it from statistics
        summed over all processes; this verifies the result, once, at the end of training.
        """
        modules = self._decorrelation_modules()
        if self.accelerator.num_processes == 1 or not modules or self._monitor is not None:
            return
        flat = torch.cat([d.R.detach().flatten().double() for d in modules])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        signature = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()])
        gathered = self.accelerator.gather(signature[None]).cpu()
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"the decorrelation matrices differ between processes: signatures {gathered.tolist()}")
        logger.info("R identical on all %d processes (%d matrices)", self.accelerator.num_processes, len(modules))

    def _skipped_updates(self) -> int:
        return sum(d.skipped_updates for d in self._decorrelation_modules())

    def _decorrelation_generators(self) -> list[RowSampler]:
        generators = {id(d.generator): d.generator for d in self._decorrelation_modules() if d.generator is not None}
        return list(generators.values())

    def _save_checkpoint(self, model, trial) -> None:
        # run_totals.json, what a run resuming from this checkpoint goes on from: every machine's figures, read now
        # (the checkpoint's card shows them too), and the training seconds. Every process takes part in the gathers.
        machines = []
        if self._meter is not None:
            self._last_emissions = self._meter.read(gather=self._gather_over_processes)
            machines = [state for state in self._gather_over_processes(self._meter.state) if state is not None]
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_run_totals(folder, machines, self._train_seconds() if self._clock_start is not None else None)
        super()._save_checkpoint(model, trial)

    def _save_rng_state(self, output_dir: str) -> None:
        # Trainer saves the python, numpy and torch generators; the rows DBP samples come from generators of ours.
        super()._save_rng_state(output_dir)
        states = [g.get_state() for g in self._decorrelation_generators()]
        torch.save(states, os.path.join(output_dir, f"decorrelation_rng_state_{self.args.process_index}.pth"))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint or "", f"decorrelation_rng_state_{self.args.process_index}.pth")
        if checkpoint is not None and os.path.isfile(path):
            for generator, state in zip(self._decorrelation_generators(), torch.load(path), strict=True):
                generator.set_state(state)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Without compute_metrics (MAE pre-training) evaluation is the loss alone: gathering the reconstructed patches
        # as well would hold a whole evaluation set of them in memory.
        loss_only = prediction_loss_only or self.compute_metrics is None
        return super().prediction_step(model, inputs, loss_only, ignore_keys=ignore_keys)

    def evaluate(self, *args, **kwargs):
        self._evaluation_start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._seconds_in_evaluation += time.perf_counter() - self._evaluation_start
            self._evaluation_start = None

    def _train_seconds(self) -> float:
        now = time.perf_counter()
        evaluating = now - self._evaluation_start if self._evaluation_start is not None else 0.0
        return now - self._clock_start - self._seconds_in_evaluation - evaluating

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Added before Trainer.log appends the record to log_history, so they land there and in trainer_state.json;
        # on a copy, because evaluate() returns the dict it logs and its metrics should stay evaluation metrics.
        logs = dict(logs)
        if "loss" in logs and self._decorrelation_losses:
            logs["decorrelation_loss"] = sum(self._decorrelation_losses) / len(self._decorrelation_losses)
            self._decorrelation_losses.clear()
            logs["decorrelation_skipped_updates"] = self._skipped_updates()
        if self._clock_start is not None and "train_runtime" not in logs:
            logs["train_seconds"] = self._train_seconds()
            if self._meter is not None:
                self._last_emissions = self._meter.read(gather=self._gather_over_processes)
                logs["energy_kwh"], logs["emissions_g"] = self._last_emissions.energy_kwh, self._last_emissions.emissions_g
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            self._write_card(output_dir or self.args.output_dir)

    def _write_card(self, folder: str) -> str:
        own_files = os.path.abspath(folder) == os.path.abspath(self.args.output_dir)
        # The run's folder: its all_results.json, and the total of all machines once training ended (the sum of the
        # last rows of their csv files, also where the machines do not share the folder), else its own csv files.
        # A checkpoint: the figures so far.
        emissions = self.emissions if own_files else (self.emissions or self._last_emissions)
        return write_model_card(
            folder,
            self.accelerator.unwrap_model(self.model).config,
            emissions=emissions,
            results=None if own_files else {k: v for r in self.state.log_history for k, v in r.items() if k.startswith("eval_")},
            training_seconds=self._train_seconds() if self._clock_start is not None else None,
            steps=self.state.global_step,
            **self._card_kwargs,
        )

    def create_model_card(self, model_name: str | None = None, finetuned_from: str | None = None,
                          dataset: str | list[str] | None = None, tags=None, **kwargs) -> None:  # fmt: skip
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
