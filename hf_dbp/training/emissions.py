"""Energy and CO2 of a training run, measured with codecarbon's offline tracker.

Where the machine is decides the carbon intensity, so the country is never guessed: it comes from (in this order)
the `--emissions_country` flag, the `CODECARBON_COUNTRY_ISO_CODE` environment variable, or codecarbon's own config
file (`country_iso_code` in `./.codecarbon.config` or `~/.codecarbon.config`). With none of them the run says so in
its log and on the model card, and the CO2 figure uses codecarbon's world-average carbon intensity.

codecarbon measures the whole machine, so only the main process of each machine runs a tracker (several processes
each measuring the machine would count it several times); the figures of all machines are summed.

Each tracker's rows (cumulative, codecarbon's columns and units: kWh, kg, s) go to `emissions.csv` on one machine and
to `emissions_machine<k>.csv` for machine k of several. A checkpoint holds `run_totals.json`: every machine's
cumulative figures when it was saved, which a run resuming from it continues from.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import os
import re
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

WORLD_AVERAGE = "unknown (codecarbon's world-average carbon intensity)"
EMISSIONS_CSV = "emissions.csv"
RUN_TOTALS = "run_totals.json"
# The columns of codecarbon's rows that add up over time: what a resumed run carries on from its checkpoint.
CUMULATIVE_COLUMNS = (
    "duration",
    "emissions",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "water_consumed",
)
_MACHINE_CSV = re.compile(r"emissions_machine(\d+)\.csv")


def emissions_csv_name(machine: int, num_machines: int) -> str:
    """The file of machine `machine`'s rows: `emissions.csv` on one machine, `emissions_machine<k>.csv` on several.

    A file per machine, not one shared file with a machine column: the machines would append to it at the same time,
    and appends from several hosts to one file on a network filesystem (NFS) can interleave or be lost. One writer
    per file needs no locking.
    """
    return EMISSIONS_CSV if num_machines == 1 else f"emissions_machine{machine}.csv"


def machine_csv_paths(folder: str) -> list[str]:
    """The `emissions_machine<k>.csv` files in `folder`, in machine order."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "emissions_machine*.csv")):
        match = _MACHINE_CSV.fullmatch(os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    return [found[k] for k in sorted(found)]


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


def combine_reports(reports: list[EmissionsReport]) -> EmissionsReport:
    """The figures of several machines (in machine order) as one: energy and CO2 summed, the longest duration (the
    machines run side by side), every location and hardware named."""
    if len(reports) == 1:
        return reports[0]
    locations = list(dict.fromkeys(r.location for r in reports))
    kinds = list(dict.fromkeys(r.hardware for r in reports))
    if len(kinds) == 1:
        hardware = f"{len(reports)} machines, each {kinds[0]}"
    else:
        hardware = f"{len(reports)} machines: " + "; ".join(r.hardware for r in reports)
    return EmissionsReport(
        energy_kwh=sum(r.energy_kwh for r in reports),
        emissions_g=sum(r.emissions_g for r in reports),
        duration_s=max(r.duration_s for r in reports),
        location=", ".join(locations),
        hardware=hardware,
        final=all(r.final for r in reports),
    )


def write_run_totals(
    folder: str, machines: list[dict], train_seconds: float | None, train_loss: dict | None = None
) -> None:
    """Write `run_totals.json` into a checkpoint: each machine's cumulative columns (codecarbon's names and units), the
    training seconds so far, and `train_loss`'s entries (the train losses so far, see `DBPTrainer`)."""
    os.makedirs(folder, exist_ok=True)
    totals = {"train_seconds": train_seconds, **(train_loss or {}), "machines": machines}
    with open(os.path.join(folder, RUN_TOTALS), "w") as file:
        json.dump(totals, file, indent=2)


def read_run_totals(folder: str | None) -> dict | None:
    """A checkpoint's `run_totals.json` (`machines` is empty if it was saved without measuring); None if it has none
    (saved by an older hf-dbp)."""
    path = os.path.join(folder or "", RUN_TOTALS)
    if folder is None or not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)


def carried_for_machine(machines: list[dict], machine: int, num_machines: int) -> dict[str, float]:
    """What machine `machine` of a resumed run continues from: its own figures in the checkpoint. Machine 0 also
    takes those of machines the checkpoint's run had beyond `num_machines`, so that the sum stays whole."""
    own = [machines[machine]] if machine < len(machines) else []
    if machine == 0 and len(machines) > num_machines:
        logger.warning(
            "The checkpoint was saved by a run on %d machines, this one has %d: machine 0 carries on the "
            "figures of machines %d-%d as well.",
            len(machines),
            num_machines,
            num_machines,
            len(machines) - 1,
        )
        own += machines[num_machines:]
    return {column: sum(float(m.get(column) or 0.0) for m in own) for column in CUMULATIVE_COLUMNS}


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
    """codecarbon's offline tracker on the main process of each machine; the figures of all machines are combined.

    Args:
        output_dir: where this machine's rows are written, one per `read()`, the last one the total: `emissions.csv`,
            or `emissions_machine<machine>.csv` when `num_machines > 1` (see [`emissions_csv_name`]).
        country_iso_code: see [`resolve_country`].
        is_local_main_process: whether this process measures its machine.
        machine, num_machines: which machine this is, of how many.
        carried: this machine's cumulative columns in the checkpoint a run resumes from (see
            [`carried_for_machine`]); every figure and row continues from them.
    """

    def __init__(
        self,
        output_dir: str,
        country_iso_code: str | None,
        is_local_main_process: bool,
        machine: int = 0,
        num_machines: int = 1,
        carried: dict[str, float] | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.csv_path = os.path.join(output_dir, emissions_csv_name(machine, num_machines))
        self.country_iso_code = country_iso_code
        self._carried = {column: float((carried or {}).get(column) or 0.0) for column in CUMULATIVE_COLUMNS}
        self.state: dict[str, float] | None = None  # this machine's cumulative columns at the last read
        self._tracker = None
        self._final: EmissionsReport | None = None
        if is_local_main_process:
            from codecarbon import OfflineEmissionsTracker

            os.makedirs(output_dir, exist_ok=True)
            if machine == 0:
                self._set_aside_other_records(num_machines)
            kwargs = {"country_iso_code": country_iso_code} if country_iso_code else {}
            # codecarbon's own csv output is off: the rows are written here, with the carried figures added. Its
            # log_level applies only once the tracker is built; before that it logs its start and "Multiple instances
            # of codecarbon are allowed" at its import-time level: raised here so a run's log shows errors only.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self._tracker = OfflineEmissionsTracker(
                output_methods=[], log_level="error", project_name="hf-dbp", allow_multiple_runs=True, **kwargs
            )
        if country_iso_code is None and is_local_main_process:
            logger.warning(
                "No country given for the emissions: CO2 uses codecarbon's world-average carbon intensity. Set "
                "--emissions_country (ISO alpha-3, e.g. FRA), CODECARBON_COUNTRY_ISO_CODE, or country_iso_code in "
                ".codecarbon.config."
            )

    def _set_aside_other_records(self, num_machines: int) -> None:
        # The output folder holds the records of one run's machines: those of an earlier run on another number of
        # machines would be summed with them. Backed up (`.bak`, as codecarbon does with a csv of another format).
        from codecarbon.core.util import backup

        ours = {emissions_csv_name(k, num_machines) for k in range(num_machines)}
        others = [os.path.join(self.output_dir, EMISSIONS_CSV)] + machine_csv_paths(self.output_dir)
        for path in others:
            if os.path.isfile(path) and os.path.basename(path) not in ours:
                logger.warning("%s is from a run on another number of machines: backed up as .bak", path)
                backup(path)

    def start(self) -> None:
        if self._tracker is not None:
            self._tracker.start()

    def _local(self, stop: bool) -> EmissionsReport | None:
        if self._tracker is None:
            return None
        if stop:
            self._tracker.stop()
            data = self._tracker.final_emissions_data
        else:
            self._tracker.flush()  # measures now
            data = self._tracker._prepare_emissions_data()  # the figures (flush returns only the CO2)
        if any(self._carried.values()):
            values = {column: getattr(data, column) + self._carried[column] for column in CUMULATIVE_COLUMNS}
            values["emissions_rate"] = values["emissions"] / values["duration"] if values["duration"] > 0 else 0.0
            data = dataclasses.replace(data, **values)
        self._write_row(dataclasses.asdict(data))
        self.state = {column: getattr(data, column) for column in CUMULATIVE_COLUMNS}
        location = data.country_name if self.country_iso_code else WORLD_AVERAGE
        hardware = f"{int(data.cpu_count)} CPU cores ({data.cpu_model})"
        if data.gpu_count:
            hardware += f", {int(data.gpu_count)} x {data.gpu_model}"
        return EmissionsReport(data.energy_consumed, data.emissions * 1000.0, data.duration, location, hardware, stop)

    def _write_row(self, row: dict) -> None:
        """Append a row in codecarbon's csv format (a file with other columns is backed up first, as codecarbon does)."""
        header = None
        if os.path.isfile(self.csv_path) and os.path.getsize(self.csv_path) > 0:
            with open(self.csv_path, newline="") as file:
                header = next(csv.reader(file), None)
            if sorted(header or []) != sorted(row):
                from codecarbon.core.util import backup

                logger.warning("%s has other columns than codecarbon's rows: backed up as .bak", self.csv_path)
                backup(self.csv_path)
                header = None
        with open(self.csv_path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header or list(row))
            if header is None:
                writer.writeheader()
            writer.writerow(row)

    def read(self, stop: bool = False, gather=None) -> EmissionsReport:
        """The cumulative figures so far (kWh, grams); `stop` ends the measurement and gives the total.

        `gather(report) -> list` collects one object from every process, in rank order, when several take part (every
        process must call it together); the result then combines the reports of all machines (see
        [`combine_reports`]), the processes that do not measure contributing None. Without it, this machine's.
        """
        if self._final is not None:
            return self._final
        local = self._local(stop)
        reports = [r for r in gather(local) if r is not None] if gather is not None else [local] if local else []
        report = combine_reports(reports) if reports else EmissionsReport(0.0, 0.0, 0.0, "", "", final=stop)
        if stop:
            self._final = report
        return report
