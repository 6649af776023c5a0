"""`DBPTrainingArguments`: `TrainingArguments` plus every setting `DBPTrainer` adds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from ..core.collectives import TRANSFER_DTYPES
from ..core.optimizer_hook import GUARDS, LR_SCHEDULES
from .optimizers import MATRIX_OPTIMIZERS

DECORRELATION_LR_SCHEDULES = LR_SCHEDULES
"""`DBPTrainingArguments.decorrelation_lr_schedule`: R's learning rate constant, or following the weights' schedule."""


def _has_other_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... alike
    if accelerator is not None:
        return accelerator.is_available()
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@dataclass
class DBPTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus every setting `DBPTrainer` adds: how the decorrelation step runs (see
    `hf_dbp.DecorrelationHook`), how to measure the run's emissions (see `hf_dbp.training.emissions`), a time budget,
    and the optimizer of the hidden matrices (see `hf_dbp.training.optimizers`). `DBPTrainer` given plain
    `TrainingArguments` uses these fields' defaults."""

    emissions_country: str | None = field(
        default=None,
        metadata={
            "help": "ISO 3166-1 alpha-3 code of the country the machines are in (e.g. FRA), for the CO2 figure. "
            "Also read from CODECARBON_COUNTRY_ISO_CODE or codecarbon's .codecarbon.config."
        },
    )
    track_emissions: bool = field(default=True, metadata={"help": "Measure energy and emissions with codecarbon."})
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop training after this much training time (evaluation not counted), like max_steps in minutes."
        },
    )

    matrix_optimizer: str = field(
        default="adamw",
        metadata={
            "help": "What updates the 2-D hidden weight matrices: 'adamw' (with everything else, as --optim says), "
            "'muon' (torch.optim.Muon, scaled to AdamW's RMS) or 'soap' (pytorch-optimizer's SOAP); with the "
            "last two AdamW keeps the rest. DBP works with any: R "
            "is updated by the decorrelation step, never by an optimizer.",
            "choices": list(MATRIX_OPTIMIZERS),
        },
    )
    muon_lr_multiplier: float = field(
        default=1.0, metadata={"help": "With --matrix_optimizer muon: Muon's learning rate over AdamW's."}
    )

    decorrelation_lr_schedule: str = field(
        default="constant",
        metadata={
            "help": "The decorrelation learning rate over training: 'constant' (the config's decorrelation_lr at "
            "every step) or 'tied' (times the weights' schedule factor: the same warm-up and decay as "
            "--lr_scheduler_type).",
            "choices": list(DECORRELATION_LR_SCHEDULES),
        },
    )

    decorrelation_overlap: bool = field(
        default=True,
        metadata={
            "help": "Over several processes, start exchanging the decorrelation statistics after the forward of "
            "each step's last micro-batch, so that it runs during the backward (off under --fp16, whose grad "
            "scaler can skip steps)."
        },
    )

    decorrelation_update_every: int = field(
        default=1,
        metadata={
            "help": "Update R every this many optimizer steps, from the statistics of all of them (a k-th of "
            "DBP's traffic between processes). 1 (the default) updates at every step, as the method does."
        },
    )

    decorrelation_transfer_dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision the decorrelation statistics travel in between processes: 'float32' (exact) or "
            "'bfloat16'/'float16' (half the bytes; R is rounded, identically on every process).",
            "choices": list(TRANSFER_DTYPES),
        },
    )

    decorrelation_guard: str = field(
        default="skip",
        metadata={
            "help": "An update of R that would make it non-finite or comes from exploding statistics (loss above "
            "--decorrelation_max_loss): 'skip' it (R stays, a warning, decorrelation_skipped_updates counts it) or "
            "'stop' the run with an error.",
            "choices": list(GUARDS),
        },
    )
    decorrelation_max_loss: float = field(
        default=1e6, metadata={"help": "The decorrelation loss taken as exploded (see --decorrelation_guard)."}
    )

    def __post_init__(self):
        # Launched as several processes (accelerate, torchrun) on a machine without GPUs, accelerate treats every
        # process as a separate single-process run unless told to use the CPU; with use_cpu they form one DDP group
        # over gloo.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.use_cpu = True
        # Pinned memory only speeds copies to an accelerator; without one, torch warns at every data loader it starts
        # (once per epoch and evaluation: ~18 times in the demo) and pins nothing.
        if self.use_cpu or not (torch.cuda.is_available() or _has_other_accelerator()):
            self.dataloader_pin_memory = False
        if self.matrix_optimizer not in MATRIX_OPTIMIZERS:
            raise ValueError(
                f"matrix_optimizer must be one of {list(MATRIX_OPTIMIZERS)}, got {self.matrix_optimizer!r}"
            )
        if self.decorrelation_lr_schedule not in DECORRELATION_LR_SCHEDULES:
            raise ValueError(
                f"decorrelation_lr_schedule must be one of {list(DECORRELATION_LR_SCHEDULES)}, got "
                f"{self.decorrelation_lr_schedule!r}"
            )
        if not (isinstance(self.decorrelation_update_every, int) and self.decorrelation_update_every >= 1):
            raise ValueError(
                f"decorrelation_update_every must be an integer >= 1, got {self.decorrelation_update_every!r}"
            )
        if self.decorrelation_transfer_dtype not in TRANSFER_DTYPES:
            raise ValueError(
                f"decorrelation_transfer_dtype must be one of {list(TRANSFER_DTYPES)}, got "
                f"{self.decorrelation_transfer_dtype!r}"
            )
        if self.decorrelation_guard not in GUARDS:
            raise ValueError(f"decorrelation_guard must be one of {list(GUARDS)}, got {self.decorrelation_guard!r}")
        if not self.decorrelation_max_loss >= 0:
            raise ValueError(f"decorrelation_max_loss must be >= 0, got {self.decorrelation_max_loss}")
        if not self.muon_lr_multiplier > 0:
            raise ValueError(f"muon_lr_multiplier must be > 0, got {self.muon_lr_multiplier}")
        super().__post_init__()


def schedule_warnings(args: TrainingArguments, total_steps: int | None) -> list[str]:
    """What in `args` does not fit a run of `total_steps` optimizer steps, one message per setting, naming the numbers
    and the flag to change: a warm-up as long as the run (the learning rate never reaches its peak) or longer than
    half of it (a recipe's warm-up for a longer run), logging or evaluation intervals longer than the run, and R
    updated less often than once in the run. Empty when all fit (or the length is unknown)."""
    if not total_steps:
        return []
    found = []
    warmup = args.get_warmup_steps(total_steps)
    given = f"--warmup_steps {args.warmup_steps:g}" + (f" ({warmup} steps)" if args.warmup_steps < 1 else "")
    if warmup >= total_steps:
        found.append(
            f"{given} is at least the whole run ({total_steps} optimizer steps): the learning rate never leaves warm-up "
            f"and never reaches --learning_rate {args.learning_rate:g} (at most {args.learning_rate * total_steps / warmup:.3g}). "
            f"Give --warmup_steps fewer steps, or a fraction of the run such as 0.1."
        )
    elif warmup > total_steps / 2:
        found.append(
            f"{given} takes {warmup} of the run's {total_steps} optimizer steps: most of the run warms up (a recipe's "
            f"warm-up meant for a longer run?). Give --warmup_steps fewer steps, or a fraction of the run such as 0.1."
        )
    intervals = (
        ("logging_steps", args.logging_strategy, "no train loss is logged before the end"),
        ("eval_steps", args.eval_strategy, "the model is not evaluated during training"),
    )
    for name, strategy, consequence in intervals:
        value = getattr(args, name) or (args.logging_steps if name == "eval_steps" else None)
        steps = getattr(strategy, "value", strategy) == "steps"
        if steps and value is not None and 1 <= value and value > total_steps:
            found.append(
                f"--{name} {value:g} is longer than the run ({total_steps} optimizer steps): {consequence}. "
                f"Give --{name} at most {total_steps}, or a fraction of the run below 1."
            )
    every = dbp_argument(args, "decorrelation_update_every")
    if every > total_steps:
        found.append(
            f"--decorrelation_update_every {every} is longer than the run ({total_steps} optimizer steps): R "
            f"is never updated. Give it at most {total_steps} (1, the method's, updates R at every step)."
        )
    return found


_DEFAULTS = {
    f.name: f.default
    for f in fields(DBPTrainingArguments)
    if f.name not in {g.name for g in fields(TrainingArguments)}
}


def dbp_argument(args: TrainingArguments, name: str):
    """`args.<name>`, one of the fields `DBPTrainingArguments` adds; its default for plain `TrainingArguments`."""
    return getattr(args, name) if isinstance(args, DBPTrainingArguments) else _DEFAULTS[name]
