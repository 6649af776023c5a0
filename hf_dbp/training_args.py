"""Training arguments shared by hf-dbp's example scripts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


@dataclass
class DBPTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus how to measure the run's emissions (see `hf_dbp.emissions`)."""

    emissions_country: str | None = field(
        default=None,
        metadata={"help": "ISO 3166-1 alpha-3 code of the country the machines are in (e.g. FRA), for the CO2 figure. "
                  "Also read from CODECARBON_COUNTRY_ISO_CODE or codecarbon's .codecarbon.config."},
    )  # fmt: skip
    track_emissions: bool = field(default=True, metadata={"help": "Measure energy and emissions with codecarbon."})
    max_train_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop training after this much training time (evaluation not counted), like max_steps in minutes."},
    )

    def __post_init__(self):
        # Launched as several processes (accelerate, torchrun) on a machine without GPUs, accelerate treats every
        # process as a separate single-process run unless told to use the CPU; with use_cpu they form one DDP group
        # over gloo.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.use_cpu = True
        super().__post_init__()
