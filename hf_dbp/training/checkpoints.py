"""Checkpoints that are whole or absent, and resuming from the newest whole one.

A run can be killed at any instant (a preempted machine, a job's time limit, the OOM killer). Trainer writes a
checkpoint folder in place, file after file, so a kill while saving leaves `checkpoint-N` with some of its files, and
the next run resumes from it and fails. Here a checkpoint is written into a staging folder (`tmp-checkpoint-N/`) by
every process, flushed to disk, and renamed to `checkpoint-N` only once complete; older checkpoints are rotated out
(`save_total_limit`) only after that. A staging folder left by a kill is ignored and removed by the next run, and a
`checkpoint-N` that lacks a file (written by other code, or damaged since) is skipped with the reason said.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from ..core.config import CONFIG_ATTRIBUTE, DecorrelationConfig, check_step_settings

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
"""A checkpoint is written to `<output_dir>/tmp-checkpoint-N/checkpoint-N` before it becomes `checkpoint-N`."""
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_SAFETENSORS = "model.safetensors"
_WEIGHTS = (_SAFETENSORS, _SAFETENSORS + ".index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file and what is wrong with it."""


MANIFEST = "checkpoint_files.json"
"""Written last into every checkpoint DBPTrainer saves (once every process's files are in): each file's name and size,
so that a checkpoint missing or shortening any file afterwards is recognised as not whole."""

_LEGACY_SETTINGS = {
    "lr": "decorrelation_lr",
    "kappa": "decorrelation_kappa",
    "sample_fraction": "decorrelation_sample_fraction",
    "variance_form": "decorrelation_variance_form",
}
"""The DBP step's settings as fields of their own, as config.json files of ViTMAE-DBP written by hf-dbp 0.1 hold them."""


def safetensors_problem(path: str) -> str | None:
    """What is wrong with a safetensors file (truncated, or not one), or None; reads its header only."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if 8 + header_size > size:
                return f"is truncated ({size:,} bytes, shorter than its {header_size:,}-byte header)"
            header = json.loads(file.read(header_size))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        return f"is not a safetensors file ({size:,} bytes)"
    if 8 + header_size + end > size:
        return f"is truncated ({size:,} bytes of {8 + header_size + end:,})"
    return None


def config_problem(path: str) -> str | None:
    """What is wrong with a model's `config.json` (not JSON, or decorrelation settings that cannot work, its own or a
    sub-config's such as a backbone's), as `<path>: <what>`; None when it is fine."""
    try:
        with open(path) as file:
            values = json.load(file)
    except (ValueError, UnicodeDecodeError) as error:
        return f"{path} is not valid JSON ({error})"
    if not isinstance(values, dict):
        return f"{path} does not hold a config (a JSON object)"

    def problems(entry: dict, where: str):
        settings = entry.get(CONFIG_ATTRIBUTE)
        if settings is not None:
            if not isinstance(settings, dict):
                yield f"{where}{CONFIG_ATTRIBUTE} must be a JSON object, got {type(settings).__name__}"
            else:
                try:
                    DecorrelationConfig.from_dict(dict(settings))
                except (TypeError, ValueError) as error:
                    yield f"{where}{CONFIG_ATTRIBUTE}: {error}"
        legacy = {name: entry[field] for name, field in _LEGACY_SETTINGS.items() if field in entry}
        if legacy:
            defaults = DecorrelationConfig()
            values = {name: legacy.get(name, getattr(defaults, name)) for name in _LEGACY_SETTINGS}
            try:
                check_step_settings(**values, prefix=f"{where}decorrelation_")
            except ValueError as error:
                yield str(error)
        for key, value in entry.items():
            if isinstance(value, dict) and key != CONFIG_ATTRIBUTE:
                yield from problems(value, f"{where}{key}.")

    found = next(problems(values, ""), None)
    return None if found is None else f"{path}: {found}"


def weights_problem(folder: str) -> str | None:
    """What is wrong with the safetensors weights of a model folder (each shard an index lists), as `<file> <what>`."""
    names = [_SAFETENSORS] if os.path.isfile(os.path.join(folder, _SAFETENSORS)) else []
    index = os.path.join(folder, _SAFETENSORS + ".index.json")
    if not names and os.path.isfile(index):
        try:
            with open(index) as file:
                names = sorted(set(json.load(file)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return f"{index} is not a valid index of safetensors shards ({error})"
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing (listed in {index})"
        if problem := safetensors_problem(path):
            return f"{path} {problem}"
    return None


def check_pretrained(path: str) -> None:
    """Before a model is loaded from the local folder `path` (`--model_name_or_path`, a checkpoint): raise a
    `ValueError` naming the file and what is wrong, for a `config.json` that is not JSON or whose decorrelation
    settings cannot work, and for a truncated or damaged `model.safetensors`. Hub ids and other paths are left to
    `from_pretrained`."""
    if not os.path.isdir(path):
        return
    config = os.path.join(path, "config.json")
    problem = (config_problem(config) if os.path.isfile(config) else None) or weights_problem(path)
    if problem is not None:
        raise ValueError(problem)


def checkpoint_problem(folder: str, needs_optimizer: bool = True) -> str | None:
    """Why `folder` cannot be resumed from (one line naming the file and what is wrong), or None for a whole one.

    A checkpoint DBPTrainer saved lists its files with their sizes (`checkpoint_files.json`): each must be there,
    whole. Any checkpoint must have its trainer state, config and weights (the weights' header checked, the config's
    decorrelation settings valid), and its optimizer state unless `needs_optimizer` is False (`save_only_model`)."""
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    names = set(os.listdir(folder))
    if MANIFEST in names:
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path) as file:
                listed = json.load(file)["files"]
        except (ValueError, KeyError, TypeError) as error:
            return f"{path} is not a valid list of the checkpoint's files ({error})"
        for name, size in sorted(listed.items()):
            file = os.path.join(folder, name)
            if not os.path.isfile(file):
                return f"{file} is missing"
            if os.path.getsize(file) != size:
                return f"{file} is damaged: {os.path.getsize(file):,} bytes, {size:,} when it was saved"
    for required in ("trainer_state.json", "config.json"):
        if required not in names:
            return f"{os.path.join(folder, required)} is missing"
    if not any(name in names for name in _WEIGHTS):
        return f"{os.path.join(folder, _SAFETENSORS)} is missing (no model weights)"
    if problem := weights_problem(folder):
        return problem
    if problem := config_problem(os.path.join(folder, "config.json")):
        return problem
    optimizer = names & {"optimizer.pt", "optimizer.bin"} or any(name.startswith("global_step") for name in names)
    if needs_optimizer and not optimizer:
        return (
            f"{os.path.join(folder, 'optimizer.pt')} is missing: the checkpoint was saved without its optimizer "
            "state (save_only_model) or damaged, so training cannot go on from it as it was"
        )
    try:
        with open(os.path.join(folder, "trainer_state.json")) as file:
            json.load(file)
    except (ValueError, UnicodeDecodeError) as error:
        return f"{os.path.join(folder, 'trainer_state.json')} is not valid JSON ({error})"
    return None


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-N` folder in `output_dir`, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return sorted(found, reverse=True)


def remove_staging_folders(output_dir: str) -> list[str]:
    """Remove what a run killed while saving left (`tmp-checkpoint-N`), saying so; returns the paths removed."""
    removed = []
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            path = os.path.join(output_dir, name)
            if name.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR) and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                if name.endswith("-removed"):
                    logger.warning(
                        "Removed %s: an old checkpoint a run was killed while deleting (save_total_limit)", path
                    )
                else:
                    logger.warning(
                        "Removed %s: a checkpoint a run was killed while saving (it was never complete)", path
                    )
    return removed


def last_whole_checkpoint(output_dir: str, needs_optimizer: bool = True) -> str | None:
    """The newest checkpoint in `output_dir` that can be resumed from; every newer one skipped is logged with why."""
    for _, path in _checkpoints(output_dir):
        problem = checkpoint_problem(path, needs_optimizer)
        if problem is None:
            return path
        logger.warning("Not resuming from %s: %s", path, problem)
    return None


def resolve_checkpoint(
    output_dir: str, resume_from_checkpoint: str | bool | None, needs_optimizer: bool = True, clean_up: bool = True
) -> str | None:
    """The checkpoint a run resumes from: `resume_from_checkpoint` itself (a path, refused with the reason when it
    is not whole), or with `True` the newest whole one in `output_dir` (None when there is none, said). Staging folders
    of killed saves are removed first, where `clean_up` (on the processes that save: the others only skip them)."""
    if not resume_from_checkpoint:
        return None
    if isinstance(resume_from_checkpoint, str):
        problem = checkpoint_problem(resume_from_checkpoint, needs_optimizer)
        if problem is not None:
            raise IncompleteCheckpointError(f"cannot resume from {resume_from_checkpoint}: {problem}")
        match = _CHECKPOINT.match(os.path.basename(os.path.normpath(resume_from_checkpoint)))
        same_folder = os.path.abspath(os.path.dirname(os.path.normpath(resume_from_checkpoint))) == os.path.abspath(
            output_dir
        )
        newer = [
            path for step, path in _checkpoints(output_dir) if match and same_folder and step > int(match.group(1))
        ]
        if newer:
            # Trainer numbers checkpoints by step: the resumed run overwrites them one by one, and until then a later
            # automatic resume would pick the newest, a checkpoint of the run abandoned here.
            logger.warning(
                "Resuming from %s while %s holds newer checkpoints (%s) of the run it abandons: they are "
                "replaced as this run reaches their steps",
                resume_from_checkpoint,
                output_dir,
                ", ".join(os.path.basename(p) for p in newer),
            )
        return resume_from_checkpoint
    removed = remove_staging_folders(output_dir) if clean_up else []
    checkpoint = last_whole_checkpoint(output_dir, needs_optimizer)
    if checkpoint is None:
        if removed or _checkpoints(output_dir):
            logger.warning("No whole checkpoint in %s to resume from: training starts from the beginning", output_dir)
    else:
        logger.info("Resuming from %s, the newest whole checkpoint in %s", checkpoint, output_dir)
    return checkpoint


def _fsync_tree(folder: str) -> None:
    """Flush every file of `folder` and the folder itself to disk, so that a rename to the final name never points to
    files that a machine crash would lose (a killed process loses nothing the kernel already has)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_dir(root)


def _write_manifest(folder: str, step: int, processes: int) -> None:
    """List every file of the checkpoint `folder` with its size (see `MANIFEST`); the last file written."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    with open(os.path.join(folder, MANIFEST), "w") as file:
        json.dump({"step": step, "processes": processes, "files": dict(sorted(files.items()))}, file, indent=1)


def _fsync_dir(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rotate_whole_checkpoints(run_dir: str, save_total_limit: int | None, newest: str, best: str | None = None) -> None:
    """Keep at most `save_total_limit` checkpoints in `run_dir`, never `newest` (the one just saved, whole) nor `best`.

    Unlike Trainer's rotation, by step rather than modification time (a filesystem with coarse times can order two
    checkpoints wrongly, and then the newest was the one deleted); checkpoints of later steps than `newest`, left by a
    run this one abandoned by resuming from an earlier checkpoint, go first. Each goes by a rename first
    (`tmp-checkpoint-N-removed`, cleaned up by the next run if this one is killed meanwhile), so that a checkpoint is
    whole or gone, never half deleted."""
    if not save_total_limit or save_total_limit <= 0:
        return
    found = _checkpoints(run_dir)  # newest step first
    if len(found) <= save_total_limit:
        return
    match = _CHECKPOINT.match(os.path.basename(newest))
    current = int(match.group(1)) if match else max(step for step, _ in found)
    protected = {os.path.abspath(newest)} | ({os.path.abspath(best)} if best else set())
    abandoned = [path for step, path in found if step > current]
    order = abandoned + [path for step, path in reversed(found) if step <= current]
    remaining = len(found)
    for path in order:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if os.path.abspath(path) in protected:
            continue
        doomed = os.path.join(run_dir, f"{STAGING_PREFIX}{os.path.basename(path)}-removed")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("Deleted %s (save_total_limit %d)", path, save_total_limit)
        remaining -= 1


def save_whole_checkpoint(trainer, model, trial, save, write_extra) -> str:
    """Save the checkpoint of `trainer`'s current step so that it appears under its name only once complete.

    `save(model, trial)` is Trainer's own `_save_checkpoint`; it writes into the staging folder (the trainer's
    `_get_output_dir` returns it meanwhile), and `write_extra(folder)` adds what else belongs to the checkpoint. Every
    process takes part; the saving ones rename, and rotate older checkpoints out afterwards.
    """
    args, state = trainer.args, trainer.state
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    run_dir = trainer._get_output_dir(trial)
    staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
    staging, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
    # Trainer records the best checkpoint's path if it exists in the folder it saves to; it is in the final one.
    if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and state.best_global_step:
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        if os.path.exists(best) or state.best_global_step == state.global_step:
            state.best_model_checkpoint = best
    if args.should_save and os.path.isdir(staging_root):
        shutil.rmtree(staging_root)
    trainer.accelerator.wait_for_everyone()
    trainer._staging_output_dir = staging_root
    try:
        save(model, trial)
        write_extra(staging)
    finally:
        trainer._staging_output_dir = None
    trainer.accelerator.wait_for_everyone()  # every process's files are in the staging folder
    if args.should_save:
        _write_manifest(staging, state.global_step, args.world_size)
        _fsync_tree(staging)
        if os.path.exists(final):  # the same step saved again: the new one is whole, the old one goes
            os.replace(final, os.path.join(staging_root, "replaced"))
        os.replace(staging, final)
        _fsync_dir(run_dir)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_whole_checkpoints(run_dir, args.save_total_limit, final, state.best_model_checkpoint)
    if args.push_to_hub:  # from the whole checkpoint (Trainer's own push, from the staging folder, was held back)
        trainer._push_from_checkpoint(final)
    trainer.accelerator.wait_for_everyone()
    return final


__all__ = [
    "MANIFEST",
    "IncompleteCheckpointError",
    "check_pretrained",
    "checkpoint_problem",
    "config_problem",
    "last_whole_checkpoint",
    "remove_staging_folders",
    "resolve_checkpoint",
    "rotate_whole_checkpoints",
    "safetensors_problem",
    "save_whole_checkpoint",
    "weights_problem",
]
