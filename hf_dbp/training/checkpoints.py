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

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
"""A checkpoint is written to `<output_dir>/tmp-checkpoint-N/checkpoint-N` before it becomes `checkpoint-N`."""
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file and what is wrong with it."""


def _safetensors_problem(path: str) -> str | None:
    """What is wrong with a safetensors file (truncated, or not one), or None; reads its header only."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if 8 + header_size > size:
                return f"is truncated ({size:,} bytes, shorter than its {header_size:,}-byte header)"
            header = json.loads(file.read(header_size))
    except (struct.error, ValueError, UnicodeDecodeError):
        return f"is not a safetensors file ({size:,} bytes)"
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_size + end > size:
        return f"is truncated ({size:,} bytes of {8 + header_size + end:,})"
    return None


def checkpoint_problem(folder: str, needs_optimizer: bool = True) -> str | None:
    """Why `folder` cannot be resumed from (one line naming the file), or None for a whole checkpoint."""
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    names = set(os.listdir(folder))
    for required in ("trainer_state.json", "config.json"):
        if required not in names:
            return f"{folder} has no {required}"
    weights = [name for name in _WEIGHTS if name in names]
    if not weights:
        return f"{folder} has no model weights (model.safetensors)"
    if "model.safetensors" in names and (problem := _safetensors_problem(os.path.join(folder, "model.safetensors"))):
        return f"{os.path.join(folder, 'model.safetensors')} {problem}"
    if needs_optimizer and not names & {"optimizer.pt", "optimizer.bin"} and not any(n.startswith("global_step") for n in names):
        return f"{folder} has no optimizer state (optimizer.pt): it was saved with save_only_model, or damaged"
    try:
        with open(os.path.join(folder, "trainer_state.json")) as file:
            json.load(file)
    except ValueError as error:
        return f"{os.path.join(folder, 'trainer_state.json')} is not valid JSON ({error})"
    return None


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-N` folder in `output_dir`, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]  # fmt: skip
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
                logger.warning("Removed %s: a checkpoint a run was killed while saving (it was never complete)", path)
    return removed


def last_whole_checkpoint(output_dir: str, needs_optimizer: bool = True) -> str | None:
    """The newest checkpoint in `output_dir` that can be resumed from; every newer one skipped is logged with why."""
    for _, path in _checkpoints(output_dir):
        problem = checkpoint_problem(path, needs_optimizer)
        if problem is None:
            return path
        logger.warning("Not resuming from %s: %s", path, problem)
    return None


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str | bool | None, needs_optimizer: bool = True):
    """The checkpoint a run resumes from: `resume_from_checkpoint` itself (a path, refused with the reason when it
    is not whole), or with `True` the newest whole one in `output_dir` (None when there is none, said). Staging folders
    of killed saves are removed first."""
    if not resume_from_checkpoint:
        return None
    if isinstance(resume_from_checkpoint, str):
        problem = checkpoint_problem(resume_from_checkpoint, needs_optimizer)
        if problem is not None:
            raise IncompleteCheckpointError(f"cannot resume from {resume_from_checkpoint}: {problem}")
        return resume_from_checkpoint
    removed = remove_staging_folders(output_dir)
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


def _fsync_dir(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
        _fsync_tree(staging)
        if os.path.exists(final):  # the same step saved again: the new one is whole, the old one goes
            os.replace(final, os.path.join(staging_root, "replaced"))
        os.replace(staging, final)
        _fsync_dir(run_dir)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)  # fmt: skip
    trainer.accelerator.wait_for_everyone()
    return final


__all__ = [
    "IncompleteCheckpointError",
    "checkpoint_problem",
    "last_whole_checkpoint",
    "remove_staging_folders",
    "resolve_checkpoint",
    "save_whole_checkpoint",
]
