"""A stand-in for codecarbon's `OfflineEmissionsTracker` in tests: deterministic figures, nothing measured.

Every measurement (each `flush()`, and the `stop()`) adds `rate` units: `rate`/1024 kWh (all of it CPU), `rate`/4096
kg of CO2 and 8 s; powers of two, so that sums of them are exact. `install()` puts it in codecarbon's place, where
`hf_dbp.training.emissions.EmissionsMeter` imports the tracker from.
"""

from __future__ import annotations

import uuid

import codecarbon
from codecarbon.output_methods.emissions_data import EmissionsData

COUNTRIES = {"FRA": "France", "DEU": "Germany"}


class FakeTracker:
    rate = 1.0

    def __init__(self, *args, country_iso_code: str | None = None, **kwargs) -> None:
        self.country_iso_code = country_iso_code or ""
        self.measurements = 0
        self.run_id = str(uuid.uuid4())

    def start(self) -> None:
        pass

    def flush(self) -> None:
        self.measurements += 1

    def stop(self) -> None:
        self.measurements += 1
        self.final_emissions_data = self._prepare_emissions_data()

    def _prepare_emissions_data(self) -> EmissionsData:
        units, seconds = self.measurements * self.rate, 8.0 * self.measurements
        return EmissionsData(
            timestamp="2026-01-01T00:00:00",
            project_name="hf-dbp",
            run_id=self.run_id,
            experiment_id="fake",
            duration=seconds,
            emissions=units / 4096,
            emissions_rate=units / 4096 / seconds if seconds else 0.0,
            cpu_power=10.0,
            gpu_power=0.0,
            ram_power=0.0,
            cpu_energy=units / 1024,
            gpu_energy=0.0,
            ram_energy=0.0,
            energy_consumed=units / 1024,
            water_consumed=0.0,
            country_name=COUNTRIES.get(self.country_iso_code, ""),
            country_iso_code=self.country_iso_code,
            region="",
            cloud_provider="",
            cloud_region="",
            os="Linux",
            python_version="3",
            codecarbon_version="fake",
            cpu_count=1,
            cpu_model=f"fake CPU at rate {self.rate:g}",
            gpu_count=0,
            gpu_model="",
            longitude=0.0,
            latitude=0.0,
            ram_total_size=1.0,
            tracking_mode="machine",
        )


def install(rate: float = 1.0) -> None:
    FakeTracker.rate = rate
    codecarbon.OfflineEmissionsTracker = FakeTracker
