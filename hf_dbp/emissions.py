"""Energy and CO2 of a training run, measured with codecarbon's offline tracker.

Where the machine is decides the carbon intensity, so the country is never guessed: it comes from (in this order)
the `--emissions_country` flag, the `CODECARBON_COUNTRY_ISO_CODE` environment variable, or codecarbon's own config
file (`country_iso_code` in `./.codecarbon.config` or `~/.codecarbon.config`). With none of them the run says so in
its log and on the model card, and the CO2 figure uses codecarbon's world-average carbon intensity.

codecarbon measures the whole machine, so only the main process of each machine runs a tracker (several processes
each measuring the machine would count it several times); the figures of all machines are summed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

WORLD_AVERAGE = "unknown (codecarbon's world-average carbon intensity)"


@dataclass
class EmissionsReport:
    """Cumulative figures of a run so far (or in total, once `final`)."""

    energy_kwh: float
    emissions_g: float
    duration_s: float
    location: str
    hardware: str
    final: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_country(flag: str | None = None) -> tuple[str | None, str]:
    """The ISO 3166-1 alpha-3 country code to measure in, and where it came from.

    Raises `ValueError` for a code codecarbon has no carbon-intensity data for (before training, not after).
    """
    from codecarbon.core.config import get_hierarchical_config

    if flag:
        code, source = flag, "--emissions_country"
    elif os.environ.get("CODECARBON_COUNTRY_ISO_CODE"):
        code, source = os.environ["CODECARBON_COUNTRY_ISO_CODE"], "CODECARBON_COUNTRY_ISO_CODE"
    elif get_hierarchical_config().get("country_iso_code"):
        code, source = get_hierarchical_config()["country_iso_code"], "codecarbon's config file"
    else:
        return None, "not given"
    code = code.strip().upper()
    if code not in _energy_mix():
        raise ValueError(
            f"country {code!r} (from {source}) is not an ISO 3166-1 alpha-3 code codecarbon knows, e.g. FRA, DEU, USA, "
            "NLD, GBR"
        )
    return code, source


def _energy_mix() -> dict:
    from codecarbon.input import DataSource

    return DataSource().get_global_energy_mix_data()


class EmissionsMeter:
    """codecarbon's offline tracker on the main process of each machine, summed over machines.

    Args:
        output_dir: where `emissions.csv` is written (one row per `read()`, the last one the total).
        country_iso_code: see :func:`resolve_country`.
        is_local_main_process: whether this process measures its machine.
    """

    def __init__(self, output_dir: str, country_iso_code: str | None, is_local_main_process: bool) -> None:
        self.output_dir = output_dir
        self.country_iso_code = country_iso_code
        self._tracker = None
        self._final: EmissionsReport | None = None
        if is_local_main_process:
            from codecarbon import OfflineEmissionsTracker

            os.makedirs(output_dir, exist_ok=True)
            kwargs = {"country_iso_code": country_iso_code} if country_iso_code else {}
            self._tracker = OfflineEmissionsTracker(
                output_dir=output_dir, output_file="emissions.csv", log_level="error", save_to_file=True,
                project_name="hf-dbp", allow_multiple_runs=True, **kwargs,
            )  # fmt: skip
        if country_iso_code is None and is_local_main_process:
            logger.warning(
                "No country given for the emissions: CO2 uses codecarbon's world-average carbon intensity. Set "
                "--emissions_country (ISO alpha-3, e.g. FRA), CODECARBON_COUNTRY_ISO_CODE, or country_iso_code in "
                ".codecarbon.config."
            )

    def start(self) -> None:
        if self._tracker is not None:
            self._tracker.start()

    def _local(self, stop: bool) -> tuple[float, float, float, str, str]:
        if self._tracker is None:
            return 0.0, 0.0, 0.0, "", ""
        if stop:
            self._tracker.stop()
            data = self._tracker.final_emissions_data
        else:
            self._tracker.flush()  # writes the running total as a row of emissions.csv
            data = self._tracker._prepare_emissions_data()  # the same figures (codecarbon returns only the CO2)
        location = data.country_name if self.country_iso_code else WORLD_AVERAGE
        hardware = f"{int(data.cpu_count)} CPU cores ({data.cpu_model})"
        if data.gpu_count:
            hardware += f", {int(data.gpu_count)} x {data.gpu_model}"
        return data.energy_consumed, data.emissions * 1000.0, data.duration, location, hardware

    def read(self, stop: bool = False, reduce=None) -> EmissionsReport:
        """The cumulative figures so far (kWh, grams); `stop` ends the measurement and gives the total.

        `reduce(values: list[float]) -> list[float]` sums over processes when several machines take part (each
        non-measuring process contributes zeros); every process must call it together.
        """
        if self._final is not None:
            return self._final
        energy, grams, seconds, location, hardware = self._local(stop)
        if reduce is not None:
            energy, grams = reduce([energy, grams])
        report = EmissionsReport(energy, grams, seconds, location, hardware, final=stop)
        if stop:
            self._final = report
        return report
