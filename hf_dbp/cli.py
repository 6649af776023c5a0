"""The `hf-dbp` command: `hf-dbp merge CHECKPOINT OUT`, `hf-dbp push FOLDER REPO_ID`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def merge(checkpoint: str, output: str) -> str:
    """Fold every R of a DBP-MAE checkpoint into its weights and save a plain ViTMAE checkpoint with its card."""
    from transformers import AutoConfig

    from . import ViTMAEDBPForPreTraining
    from .model_card import read_emissions_csv, read_results, write_model_card

    model_type = AutoConfig.from_pretrained(checkpoint).model_type
    if model_type != "vit_mae_dbp":
        raise ValueError(f"{checkpoint} is a {model_type!r} checkpoint; `hf-dbp merge` folds the R of a 'vit_mae_dbp' one")
    merged = ViTMAEDBPForPreTraining.from_pretrained(checkpoint).merge_decorrelation()
    merged.save_pretrained(output)
    for name in ("preprocessor_config.json", "all_results.json"):  # what a user needs with the weights
        if os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy(os.path.join(checkpoint, name), os.path.join(output, name))
    write_model_card(
        output, merged.config, results=read_results(checkpoint), emissions=read_emissions_csv(checkpoint),
        merged_from=checkpoint, base_model=None if os.path.isdir(checkpoint) else checkpoint,
    )  # fmt: skip
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-dbp", description="Decorrelated backpropagation for vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge_parser = commands.add_parser(
        "merge", help="fold R into the weights: a plain ViTMAE checkpoint anyone can load",
        description="Fold every decorrelation matrix R of a DBP-MAE checkpoint into its weights (W <- W R) and save "
        "a plain transformers ViTMAE checkpoint with the same outputs, with its model card. It loads with "
        "ViTMAEForPreTraining, ViTModel (the encoder), or as the segmentation backbone, without hf_dbp.",
    )  # fmt: skip
    merge_parser.add_argument("checkpoint", help="a vit_mae_dbp checkpoint (folder or Hub id)")
    merge_parser.add_argument("output", help="folder for the plain checkpoint")
    push_parser = commands.add_parser(
        "push", help="upload a finished output folder to the Hub",
        description="Upload a saved folder (checkpoint, model card with emissions, results) to a Hub model repo, "
        "creating it if needed. Use it after a run saved locally (without --push_to_hub).",
    )  # fmt: skip
    push_parser.add_argument("folder", help="the run's output folder")
    push_parser.add_argument("repo_id", help="e.g. your-name/dbp-mae-vit-b16")
    push_parser.add_argument("--private", action="store_true", help="create the repo as private")
    push_parser.add_argument("--token", default=None, help="Hub token (default: the one `hf auth login` stored)")
    push_parser.add_argument("--commit_message", default="Upload with hf-dbp")
    args = parser.parse_args(argv)

    try:
        if args.command == "merge":
            print(f"Saved the merged plain ViTMAE checkpoint to {merge(args.checkpoint, args.output)}")
        else:
            from .hub import ensure_hub_reachable, push_folder

            ensure_hub_reachable(args.token, what="`hf-dbp push`", token_option="--token", hint=(
                f"{args.folder} stays saved locally as it is: run `hf-dbp push` again where the Hub can be reached."
            ))  # fmt: skip
            print(push_folder(args.folder, args.repo_id, token=args.token, private=args.private or None,
                              commit_message=args.commit_message))  # fmt: skip
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"hf-dbp {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
