"""Training arguments shared by hf-dbp's example scripts."""

from __future__ import annotations

from dataclasses import dataclass, field

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
