"""Run by tests/test_kill_and_resume.py: kills real runs of the example scripts with SIGKILL and resumes them.

`python tests/kill_worker.py PLAN.json REPORT.json`. The worker imports torch, transformers, datasets, hf_dbp and the
example scripts once, then forks every run from itself: a forked child sets `sys.argv` and calls the script's `main`
through `run_main`, exactly as `python examples/<script> ARGS` does after its imports (which take most of a tiny run's
time). The parent never runs a torch operation, so forking is safe.

The children draw no training_curves.png (the one part of the scripts left out: most of a tiny run's last second,
and not what is tested). Each child writes its phase to a file (`<phase> <step>` lines with a timestamp: starting, training, saving,
evaluating, finishing) through a callback and two method wrappers; nothing of what is tested is changed. For each job
of the plan the worker:

1. runs the command once uninterrupted (the reference) and records how long each phase took;
2. for each kill point, chosen with a seeded generator: a phase (training, saving, evaluating or finishing), one of its
   occurrences spread over the run, and a delay of a random fraction of that occurrence's duration in the reference,
   starts the same command in a fresh output folder, whose process stops itself (SIGSTOP) when that phase begins;
   once the worker sees it stopped it lets it go on (SIGCONT), sleeps the delay and SIGKILLs it (on 2 processes: one
   of them; the other then as torchrun would, after a random moment); it notes where the kill landed and what was
   on disk, and runs the same command again (the resume), which must finish.

codecarbon's tracker is tests/fake_tracker.py (deterministic figures), so emissions totals compare exactly.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fake_tracker  # noqa: E402
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401
from transformers import TrainerCallback  # noqa: E402

import hf_dbp  # noqa: E402, F401
from hf_dbp.tasks.scripts import run_main  # noqa: E402
from hf_dbp.training import trainer as trainer_module  # noqa: E402
from hf_dbp.training.checkpoints import _checkpoints, checkpoint_problem  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
KILLED_PHASES = ("training", "saving", "evaluating", "finishing")
_modules = {}


def load_script(path: str):
    if path not in _modules:
        spec = importlib.util.spec_from_file_location(f"script_{len(_modules)}", REPO_ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


# ----------------------------------------------------------------------------------------------------------------------
# In the child: phase markers


class Phases:
    file = None
    current = ("starting", 0)
    pause_at: tuple[str, int] | None = None  # the phase the parent kills this run in

    @classmethod
    def write(cls, phase: str, step: int) -> None:
        cls.current = (phase, step)
        os.write(cls.file, f"{time.monotonic():.6f} {phase} {step}\n".encode())
        if (phase, step) == cls.pause_at:
            # Stopped until the parent has seen it: the kill's moment is then the chosen delay into the phase, however
            # late the parent notices (the machine may be busy).
            cls.pause_at = None
            os.kill(os.getpid(), signal.SIGSTOP)


class PhaseCallback(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        Phases.write("training", state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        Phases.write("training", state.global_step + 1)

    def on_train_end(self, args, state, control, **kwargs):
        Phases.write("finishing", state.global_step)


def instrument() -> None:
    DBPTrainer = trainer_module.DBPTrainer
    init, save, evaluate = DBPTrainer.__init__, DBPTrainer._save_checkpoint, DBPTrainer.evaluate

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(PhaseCallback())

    def _save_checkpoint(self, model, trial):
        before = Phases.current
        Phases.write("saving", self.state.global_step)
        save(self, model, trial)
        Phases.write(*before)

    def evaluate_(self, *args, **kwargs):
        before = Phases.current
        Phases.write("evaluating", self.state.global_step)
        result = evaluate(self, *args, **kwargs)
        Phases.write(*before)
        return result

    DBPTrainer.__init__, DBPTrainer._save_checkpoint, DBPTrainer.evaluate = __init__, _save_checkpoint, evaluate_


def start(script: str, argv: list[str], log: Path, phases: Path, env: dict[str, str]) -> int:
    """Fork a child that runs `script` with `argv` (as `python script argv...` would); returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        Phases.file = os.open(phases, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.environ.update(env)
        fake_tracker.install(rate=1.0 + int(env.get("RANK", "0")))
        instrument()
        if env.get("PAUSE_AT"):
            phase, step = env["PAUSE_AT"].split()
            Phases.pause_at = (phase, int(step))
        Phases.write("starting", 0)
        module = load_script(script)
        # The one thing left out: drawing training_curves.png (most of a tiny run's last second, and not what is tested).
        if hasattr(module, "plot_training_curves"):
            module.plot_training_curves = lambda *args, **kwargs: None
        sys.argv = [str(REPO_ROOT / script), *argv]
        try:
            run_main(module.main)
            code = 0
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: dict, output_dir: Path, name: str, pause: dict | None = None) -> list[dict]:
    """Start the job's command writing to `output_dir`, on `world_size` processes; one dict per process. With `pause`
    (a kill point), its process stops itself when its phase begins."""
    argv = [a.replace("{output_dir}", str(output_dir)) for a in job["args"]]
    world = job.get("world_size", 1)
    port = str(free_port())
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in range(world):
        env = {"RANK": str(rank), "GROUP_RANK": "0"}
        if pause is not None and rank == pause["rank"]:
            env["PAUSE_AT"] = f"{pause['phase']} {pause['step']}"
        if world > 1:
            env.update(
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        log, phases = output_dir.parent / f"{name}.rank{rank}.log", output_dir.parent / f"{name}.rank{rank}.phases"
        pid = start(job["script"], argv, log, phases, env)
        processes.append({"pid": pid, "log": log, "phases": phases, "code": None})
    return processes


def reap(process: dict, block: bool = True) -> bool:
    if process["code"] is not None:
        return True
    pid, status = os.waitpid(process["pid"], 0 if block else os.WNOHANG)
    if pid == 0:
        return False
    process["code"] = os.waitstatus_to_exitcode(status)
    return True


def wait_all(processes: list[dict], timeout: float) -> None:
    """Wait for every process; once one failed, the others are killed, as torchrun does."""
    deadline = time.monotonic() + timeout
    while not all(reap(p, block=False) for p in processes):
        if time.monotonic() > deadline or any(p["code"] not in (None, 0) for p in processes):
            for p in processes:
                if p["code"] is None:
                    os.kill(p["pid"], signal.SIGKILL)
                    reap(p)
            break
        time.sleep(0.005)


def read_phases(path: Path) -> list[tuple[float, str, int]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [
        (float(t), phase, int(step)) for t, phase, step in (line.split() for line in lines if line.count(" ") == 2)
    ]


def occurrences(timeline: list[tuple[float, str, int]]) -> dict[str, list[tuple[int, float]]]:
    """Each phase's occurrences in a reference timeline: `(step, duration)`."""
    found = {phase: [] for phase in KILLED_PHASES}
    for (t, phase, step), (t_next, _, _) in zip(timeline, timeline[1:], strict=False):
        if phase in found and (not found[phase] or found[phase][-1][0] != step or phase != "training"):
            found[phase].append((step, t_next - t))
    return found


def choose_kill_points(rng: random.Random, found: dict, count: int, world: int, phases=None) -> list[dict]:
    """`count` kill points: by default one in finishing, the rest in training, saving and evaluating in turn; else
    `phases` in turn. The occurrences of each phase spread over the run (the k-th of m kills in a phase falls in the
    k-th m-th of them)."""
    if phases:
        kinds = [phases[i % len(phases)] for i in range(count)]
    else:
        kinds = ["finishing"] + [("training", "saving", "evaluating")[i % 3] for i in range(count - 1)]
    rng.shuffle(kinds)
    points = []
    for phase in dict.fromkeys(kinds):
        m, candidates = kinds.count(phase), found[phase]
        for k in range(m):
            lo, hi = len(candidates) * k // m, max(len(candidates) * (k + 1) // m, len(candidates) * k // m + 1)
            step, duration = candidates[rng.randrange(lo, min(hi, len(candidates)))]
            points.append(
                {
                    "phase": phase,
                    "step": step,
                    "delay": rng.uniform(0.05, 0.95) * duration,
                    "rank": rng.randrange(world),
                    "survivor_delay": rng.uniform(0.0, 0.2),
                }
            )
    order = {phase: i for i, phase in enumerate(KILLED_PHASES)}
    return sorted(points, key=lambda p: (order[p["phase"]], p["step"]))


def on_disk(output_dir: Path) -> dict:
    staging = sorted(p.name for p in output_dir.glob("tmp-checkpoint-*")) if output_dir.exists() else []
    checkpoints = [Path(path).name for _, path in _checkpoints(str(output_dir))]
    whole = [name for name in checkpoints if checkpoint_problem(str(output_dir / name)) is None]
    return {
        "staging": staging,
        "checkpoints": checkpoints,
        "newest_whole": whole[0] if whole else None,
        "final_model": (output_dir / "model.safetensors").exists(),
    }


RESUME_LINES = ("Resuming from", "Removed ", "Not resuming", "Nothing to train", "No whole checkpoint", "Done: ")


def wait_stopped(process: dict, others: list[dict], deadline: float) -> bool:
    """Wait until `process` stops itself at its kill point; False if it ended first (or another process failed)."""
    while time.monotonic() < deadline:
        pid, status = os.waitpid(process["pid"], os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            return True
        if pid:
            process["code"] = os.waitstatus_to_exitcode(status)
            return False
        if any(reap(p, block=False) and p["code"] != 0 for p in others):
            return False
        time.sleep(0.002)
    return False


def kill_and_resume(job: dict, point: dict, output_dir: Path, timeout: float) -> dict:
    processes = launch(job, output_dir, "killed", pause=point)
    target = processes[point["rank"]]
    others = [p for p in processes if p is not target]
    result = dict(point)
    if wait_stopped(target, others, time.monotonic() + timeout):
        os.kill(target["pid"], signal.SIGCONT)
        time.sleep(point["delay"])
    else:
        result["missed"] = "the run ended or failed before the phase began"
    if not reap(target, block=False):
        os.kill(target["pid"], signal.SIGKILL)
        reap(target)
    result["killed_code"] = target["code"]
    if target["code"] != -signal.SIGKILL and "missed" not in result:  # it finished within the delay: tried again
        wait_all(others, timeout)
        result["missed"] = "the run finished within the delay"
        return result
    landed = read_phases(target["phases"])[-1]
    result["landed"], result["landed_step"] = landed[1], landed[2]
    if others:  # as torchrun: the others are stopped once one process died, after a moment of their own
        time.sleep(point["survivor_delay"])
        for p in others:
            if not reap(p, block=False):
                os.kill(p["pid"], signal.SIGKILL)
                reap(p)
        result["others_code"] = [p["code"] for p in others]
        result["others_landed"] = [read_phases(p["phases"])[-1][1:] for p in others]
    result["on_disk"] = on_disk(output_dir)
    resumed = launch(job, output_dir, "resumed")
    wait_all(resumed, timeout)
    result["resumed_codes"] = [p["code"] for p in resumed]
    log = resumed[0]["log"].read_text(errors="replace")
    result["resumed_said"] = [
        line.split(" - ", 3)[-1] for line in log.splitlines() if any(s in line for s in RESUME_LINES)
    ]
    if any(p["code"] != 0 for p in resumed):
        result["resumed_log_tail"] = log[-4000:]
    result["output_dir"] = str(output_dir)
    return result


def run_job(job: dict, root: Path, seed: int, timeout: float) -> dict:
    folder = root / job["name"]
    reference = launch(job, folder / "reference" / "out", "reference")
    wait_all(reference, timeout)
    report = {
        "reference": str(folder / "reference" / "out"),
        "reference_codes": [p["code"] for p in reference],
        "kills": [],
    }
    if any(p["code"] != 0 for p in reference):
        report["reference_log_tail"] = reference[0]["log"].read_text(errors="replace")[-4000:]
        return report
    found = occurrences(read_phases(reference[0]["phases"]))
    report["phase_counts"] = {phase: len(items) for phase, items in found.items()}
    rng = random.Random(f"{seed}-{job['name']}")
    for i, point in enumerate(
        choose_kill_points(rng, found, job["kills"], job.get("world_size", 1), job.get("phases"))
    ):
        began, tries = time.monotonic(), []
        while True:  # a delay the run outlasted this time (the machine was faster than for the reference) is halved
            output_dir = folder / f"kill{i:02d}" / "out"
            shutil.rmtree(output_dir, ignore_errors=True)
            result = kill_and_resume(job, dict(point), output_dir, timeout)
            if result.get("missed") != "the run finished within the delay" or len(tries) == 3:
                break
            tries.append(point["delay"])
            point["delay"] /= 2
        result["earlier_delays"] = tries
        result["seconds"] = round(time.monotonic() - began, 2)
        report["kills"].append(result)
    return report


def preload(scripts: list[str]) -> None:
    """What a run imports lazily, imported once here (no torch operation): the scripts, albumentations, deepspeed
    (accelerate's checks import it); then the heap is frozen, so that each child's
    `gc.collect()` (accelerate calls it when training starts) does not walk every imported module."""
    for path in scripts:
        load_script(path)
    import hf_dbp.tasks.image_data  # noqa: F401

    for name in ("albumentations", "deepspeed"):
        try:
            importlib.import_module(name)
        except Exception:  # optional: only what is installed
            pass
    gc.collect()
    gc.freeze()


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    root = Path(plan["root"])
    preload(plan.get("preload", []))
    report = {}
    for job in plan["jobs"]:
        began = time.monotonic()
        report[job["name"]] = run_job(job, root, plan.get("seed", 0), plan.get("timeout", 120))
        report[job["name"]]["seconds"] = round(time.monotonic() - began, 2)
    Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
