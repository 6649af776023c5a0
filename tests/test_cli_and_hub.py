"""The `hf-dbp` command (merge, push) and publishing to the Hub, tested up to the upload.

Nothing here reaches the Hugging Face Hub: `push_folder` gets a stand-in API that copies the folder into a local
directory (the "Hub repo"), and what must fail offline runs with HF_HUB_OFFLINE=1. The commands and scripts run in
subprocesses, started once and two at a time by module-scoped fixtures (most of their time is imports, on one core).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MAE_SCRIPT, REPO_ROOT, SEGMENTATION_SCRIPT, TINY_ENCODER, offline_env
from huggingface_hub import ModelCard
from transformers import ViTMAEConfig, ViTMAEForPreTraining

import hf_dbp
from hf_dbp.cli import main as cli_main
from hf_dbp.training.hub import push_folder

HF_DBP = Path(sys.executable).parent / "hf-dbp"  # the console script

TINY_MODEL = dict(TINY_ENCODER)
# codecarbon's emissions.csv header (codecarbon 3.3), copied from a real run, and one row of it (kg, kWh).
EMISSIONS_CSV = (
    "timestamp,project_name,run_id,experiment_id,duration,emissions,emissions_rate,cpu_power,gpu_power,ram_power,"
    "cpu_energy,gpu_energy,ram_energy,energy_consumed,water_consumed,country_name,country_iso_code,region,"
    "cloud_provider,cloud_region,os,python_version,codecarbon_version,cpu_count,cpu_model,gpu_count,gpu_model,"
    "longitude,latitude,ram_total_size,tracking_mode,cpu_utilization_percent,gpu_utilization_percent,"
    "ram_utilization_percent,ram_used_gb,on_cloud,pue,wue\n"
    "2026-01-01T00:00:00,hf-dbp,r,e,3600.0,0.0125,3.5e-06,40.0,300.0,20.0,0.04,0.3,0.02,0.36,0.0,France,FRA,,,,"
    "Linux,3.11.7,3.3.2,8,AMD EPYC,1,NVIDIA H100,,,32.0,machine,50,90,20,6.0,N,1.0,0.0\n"
)
EMISSIONS_G = 12.5  # 0.0125 kg
RESULTS = {"eval_loss": 0.4321, "train_loss": 0.5}


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def run(args: list, hf_home: Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run a command (stdout and stderr merged), offline."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=offline_env(hf_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def run_all(jobs: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Call the jobs two at a time, in the order given (longest first)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_exit(result: subprocess.CompletedProcess, success: bool) -> None:
    if success:
        assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-6000:]}"
    else:
        assert result.returncode != 0, f"should have failed:\n{result.stdout[-3000:]}"


def make_dbp_checkpoint(path: Path) -> hf_dbp.ViTMAEDBPForPreTraining:
    """A tiny DBP-MAE checkpoint whose R are far from the identity (folding them changes every W), with a run's
    emissions.csv and all_results.json beside it."""
    torch.manual_seed(0)
    model = hf_dbp.ViTMAEDBPForPreTraining(hf_dbp.ViTMAEDBPConfig(**TINY_MODEL)).eval()
    with torch.no_grad():
        for module in model.decorrelation_modules():
            module.R.add_(0.1 * torch.randn_like(module.R))
    model.save_pretrained(path)
    (path / "emissions.csv").write_text(EMISSIONS_CSV)
    (path / "all_results.json").write_text(json.dumps(RESULTS))
    return model


def load_card(folder: Path) -> ModelCard:
    assert (folder / "README.md").is_file(), f"no README.md in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return ModelCard.load(folder / "README.md")


# The plain user: transformers alone, never hf_dbp. Loads the merged folder three ways and saves their outputs.
PLAIN_LOADER = textwrap.dedent(
    """
    import sys

    import torch
    from transformers import AutoModelForPreTraining, ViTMAEForPreTraining, ViTModel

    folder, inputs, outputs = sys.argv[1:]
    data = torch.load(inputs)
    mae, info = ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    encoder, info = ViTModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"], info
    assert type(AutoModelForPreTraining.from_pretrained(folder)) is ViTMAEForPreTraining
    with torch.no_grad():
        out = mae.eval()(pixel_values=data["pixel_values"], noise=data["noise"])
        hidden = encoder.eval()(pixel_values=data["pixel_values"]).last_hidden_state
    torch.save({"logits": out.logits, "loss": out.loss, "mask": out.mask, "last_hidden_state": hidden}, outputs)
    assert "hf_dbp" not in sys.modules, "hf_dbp was imported"
    print("PLAIN-LOAD-OK", "hf_dbp" in sys.modules)
    """
)


# ----------------------------------------------------------------------------------------------------------------------
# The runs


def merge_then_load(root: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess | None]:
    """`hf-dbp merge` of root/dbp into root/merged, then PLAIN_LOADER on root/merged in a process without hf_dbp,
    on inputs saved in root/inputs.pt (its outputs in root/outputs.pt)."""
    merge = run([HF_DBP, "merge", root / "dbp", root / "merged"], root / "hf_home_merge")
    if merge.returncode != 0:
        return merge, None
    (root / "plain_loader.py").write_text(PLAIN_LOADER)
    load = run(
        [sys.executable, root / "plain_loader.py", root / "merged", root / "inputs.pt", root / "outputs.pt"],
        root / "hf_home_plain",
        cwd=root,
    )
    return merge, load


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> SimpleNamespace:
    """The commands of this module that run in subprocesses, each once:

    - merge: `hf-dbp merge` (the console script) of the DBP checkpoint, then plain_load: the plain loader on its
      output;
    - push_offline: `hf-dbp push` with HF_HUB_OFFLINE=1;
    - mae_push_offline, segmentation_push_offline: the scripts with --push_to_hub and HF_HUB_OFFLINE=1.
    """
    root = tmp_path_factory.mktemp("cli")
    dbp = make_dbp_checkpoint(root / "dbp")
    shutil.copytree(root / "dbp", root / "to_push")
    torch.manual_seed(1)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "noise": torch.rand(2, 16)}
    torch.save(inputs, root / "inputs.pt")
    overrides = ",".join(f"{k}={v}" for k, v in TINY_MODEL.items())
    # Both scripts would fail later, and otherwise (no images here, no such data or checkpoint): the Hub check must
    # stop them first.
    mae_args = [
        sys.executable,
        MAE_SCRIPT,
        "--train_dir",
        root / "no_images",
        "--config_overrides",
        overrides,
        "--max_steps",
        "2",
        "--report_to",
        "none",
        "--output_dir",
        root / "mae_out",
        "--push_to_hub",
        "--hub_model_id",
        "me/x",
    ]
    segmentation_args = [
        sys.executable,
        SEGMENTATION_SCRIPT,
        "--data_dir",
        root / "no_data",
        "--model_name_or_path",
        root / "no_checkpoint",
        "--max_steps",
        "2",
        "--report_to",
        "none",
        "--output_dir",
        root / "segmentation_out",
        "--push_to_hub",
        "--hub_model_id",
        "me/x",
    ]
    results = run_all(
        {
            "merge": partial(merge_then_load, root),
            "mae_push_offline": partial(run, mae_args, root / "hf_home_mae"),
            "segmentation_push_offline": partial(run, segmentation_args, root / "hf_home_segmentation"),
            "push_offline": partial(run, [HF_DBP, "push", root / "to_push", "me/x"], root / "hf_home_push"),
        }
    )
    results["merge"], results["plain_load"] = results["merge"]
    return SimpleNamespace(root=root, dbp=dbp, inputs=inputs, results=results)


@pytest.fixture(scope="module")
def plain_load(cli) -> SimpleNamespace:
    """The outputs of the merged folder loaded by PLAIN_LOADER, in a process without hf_dbp."""
    assert_exit(cli.results["merge"], success=True)
    result = cli.results["plain_load"]
    assert_exit(result, success=True)
    assert "PLAIN-LOAD-OK False" in result.stdout
    return SimpleNamespace(inputs=cli.inputs, outputs=torch.load(cli.root / "outputs.pt"))


# ----------------------------------------------------------------------------------------------------------------------
# 5. hf-dbp merge


def test_merged_checkpoint_gives_the_dbp_outputs_with_plain_transformers(cli, plain_load):
    """transformers' ViTMAEForPreTraining, in a process that never imports hf_dbp, gives the DBP model's
    reconstruction and loss for the same images and masking noise."""
    with torch.no_grad():
        expected = cli.dbp(**plain_load.inputs)
    got = plain_load.outputs
    assert torch.equal(got["mask"], expected.mask)
    torch.testing.assert_close(got["logits"], expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["loss"], expected.loss, rtol=1e-4, atol=1e-6)


def test_merged_checkpoint_loads_as_vit_model(cli, plain_load):
    """transformers' ViTModel (the encoder alone, every patch) gives the DBP encoder's hidden states with no
    masking (mask ratio 0, patches in their order)."""
    encoder = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(cli.root / "dbp", mask_ratio=0.0).vit.eval()
    pixel_values = plain_load.inputs["pixel_values"]
    in_order = torch.arange(16, dtype=torch.float32).expand(pixel_values.shape[0], 16)
    with torch.no_grad():
        expected = encoder(pixel_values=pixel_values, noise=in_order).last_hidden_state
    torch.testing.assert_close(plain_load.outputs["last_hidden_state"], expected, rtol=1e-4, atol=1e-5)


def test_merged_weights_are_w_times_r(cli):
    """The merged weights are W R: the folding changed them (R is not the identity), and the saved config is a plain
    ViTMAE one that points to no hf_dbp code."""
    assert_exit(cli.results["merge"], success=True)
    merged = ViTMAEForPreTraining.from_pretrained(cli.root / "merged")
    config = json.loads((cli.root / "merged" / "config.json").read_text())
    assert config["model_type"] == "vit_mae" and config["architectures"] == ["ViTMAEForPreTraining"]
    assert "auto_map" not in config, config["auto_map"]
    assert not any(key.startswith("decorrelation_") for key in config)
    assert not list((cli.root / "merged").glob("*.py"))
    source = cli.dbp.vit.layers[1].mlp
    w, r = source.fc1.weight, source.fc1_decorrelation.R
    torch.testing.assert_close(merged.vit.layers[1].mlp.fc1.weight, w @ r)
    assert not torch.allclose(merged.vit.layers[1].mlp.fc1.weight, w, atol=1e-3)


def test_merged_card_carries_the_source_figures(cli):
    """The merged folder's README.md parses, says where it was merged from, and carries the source's emissions
    (grams) and results; all_results.json is copied along."""
    assert_exit(cli.results["merge"], success=True)
    merged = cli.root / "merged"
    card = load_card(merged)
    co2 = card.data.co2_eq_emissions
    assert co2["emissions"] == pytest.approx(EMISSIONS_G, rel=1e-12)
    assert co2["geographical_location"] == "France" and co2["source"] == "codecarbon"
    assert "1 x NVIDIA H100" in co2["hardware_used"]
    [result] = card.data.eval_results
    assert result.metric_value == RESULTS["eval_loss"]
    assert "dbp" in card.data.tags
    assert f"hf-dbp merge {cli.root / 'dbp'}" in card.text
    assert "import hf_dbp" not in card.text and "ViTMAEForPreTraining.from_pretrained" in card.text
    assert json.loads((merged / "all_results.json").read_text()) == RESULTS
    assert "Saved the merged plain checkpoint" in cli.results["merge"].stdout


def test_merged_checkpoint_is_a_segmentation_backbone(cli):
    """The merged folder (a plain ViTMAE checkpoint) becomes UperNet's backbone with its weights, and segments."""
    assert_exit(cli.results["merge"], success=True)
    model, _ = hf_dbp.upernet_from_pretraining_checkpoint(
        str(cli.root / "merged"), {0: "a", 1: "b"}, hidden_size=16, auxiliary_channels=8
    )
    merged = ViTMAEForPreTraining.from_pretrained(cli.root / "merged")
    torch.testing.assert_close(model.backbone.vit.layers[2].mlp.fc2.weight, merged.vit.layers[2].mlp.fc2.weight)
    with torch.no_grad():
        logits = model.eval()(pixel_values=torch.randn(1, 3, 16, 16)).logits
    assert logits.shape == (1, 2, 16, 16) and torch.isfinite(logits).all()


def test_merge_refuses_a_checkpoint_without_r(tmp_path, capsys):
    """`hf-dbp merge` of a plain ViTMAE checkpoint returns exit status 1 (the console script exits with `main`'s
    return value) with a one-line message naming both model types, and writes nothing."""
    ViTMAEForPreTraining(ViTMAEConfig(**TINY_MODEL)).save_pretrained(tmp_path / "plain")
    assert cli_main(["merge", str(tmp_path / "plain"), str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("hf-dbp merge: ") and "'vit_mae'" in message and "'vit_mae_dbp'" in message, message
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--help"], ("merge", "push")),
        (["merge", "--help"], ("checkpoint", "output", "ViTModel")),
        (["push", "--help"], ("folder", "repo_id", "--private", "--token")),
    ],
)
def test_help(argv, words, capsys):
    """`hf-dbp --help` and the help of both commands exit 0 and describe them (the console script itself runs in
    the merge and push tests)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in words), text


# ----------------------------------------------------------------------------------------------------------------------
# 6. Pushing


class FakeHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls, and uploads by copying the folder (without what
    `ignore_patterns` matches, as fnmatch on the path relative to the folder) into `hub/<repo_id>`."""

    def __init__(self, hub: Path) -> None:
        self.hub = hub
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        (self.hub / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path: str, repo_id: str, ignore_patterns=None, **kwargs):
        self.calls.append(
            (
                "upload_folder",
                {"folder_path": folder_path, "repo_id": repo_id, "ignore_patterns": ignore_patterns, **kwargs},
            )
        )
        assert (self.hub / repo_id).is_dir(), "upload before create_repo"
        folder = Path(folder_path)
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(relative, p) for p in ignore_patterns or []):
                target = self.hub / repo_id / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")


def make_run_folder(path: Path) -> Path:
    """A finished run's output folder without a model card: the model, its figures, and checkpoints."""
    make_dbp_checkpoint(path)
    for step in (2, 4):
        shutil.copytree(path, path / f"checkpoint-{step}", ignore=shutil.ignore_patterns("checkpoint-*"))
    (path / "trainer_state.json").write_text("{}")
    (path / "emissions.csv.lock").write_text("")
    return path


def test_push_folder_uploads_the_model_with_a_card(tmp_path):
    """push_folder creates the repo, writes a card (the folder had none), and uploads the model, its card and
    figures, but no checkpoint-* folder."""
    folder = make_run_folder(tmp_path / "run")
    api = FakeHubApi(tmp_path / "hub")
    url = push_folder(str(folder), "me/dbp-tiny", private=True, commit_message="first", api=api)
    assert url == "https://huggingface.co/me/dbp-tiny/commit/0123abc"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create, upload = (kwargs for _, kwargs in api.calls)
    assert create["repo_id"] == "me/dbp-tiny" and create["private"] is True and create["exist_ok"] is True
    assert upload["commit_message"] == "first" and upload["folder_path"] == str(folder)

    repo = tmp_path / "hub" / "me" / "dbp-tiny"
    uploaded = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    for name in ("config.json", "model.safetensors", "README.md", "emissions.csv", "all_results.json"):
        assert name in uploaded, uploaded
    assert not [name for name in uploaded if "checkpoint-" in name], uploaded
    assert not [name for name in uploaded if name.endswith(".lock")], uploaded

    card = load_card(repo)
    assert card.data.co2_eq_emissions["emissions"] == pytest.approx(EMISSIONS_G, rel=1e-12)
    assert card.data.eval_results[0].metric_value == RESULTS["eval_loss"]
    assert card.data.model_name == "me/dbp-tiny"
    assert 'from_pretrained("me/dbp-tiny")' in card.text
    assert (folder / "README.md").read_text() == (repo / "README.md").read_text()


def test_push_folder_keeps_an_existing_card_and_needs_a_model(tmp_path):
    """A folder's own README.md is pushed as it is; a folder without config.json is refused before any call."""
    folder = make_run_folder(tmp_path / "run")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    api = FakeHubApi(tmp_path / "hub")
    push_folder(str(folder), "me/own", api=api)
    assert (tmp_path / "hub" / "me" / "own" / "README.md").read_text() == "---\nlicense: mit\n---\n# my own card\n"

    (tmp_path / "empty").mkdir()
    api = FakeHubApi(tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_folder(str(tmp_path / "empty"), "me/empty", api=api)
    assert api.calls == []


def test_push_command_offline_fails_and_keeps_the_folder(cli):
    """`hf-dbp push` with HF_HUB_OFFLINE=1 exits 1 with a message that names the command, the offline setting, and
    that the folder stays saved locally; it writes nothing into the folder (no card)."""
    result = cli.results["push_offline"]
    assert result.returncode == 1, result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    message = result.stdout.strip().splitlines()[-1]
    assert message.startswith("hf-dbp push: "), message
    assert "HF_HUB_OFFLINE" in message and "hf-dbp push" in message.removeprefix("hf-dbp push: ")
    assert "locally" in message and "--push_to_hub" not in message, message
    assert not (cli.root / "to_push" / "README.md").exists()


def test_trainer_card_for_push_to_hub_names_the_repo(tmp_path):
    """What Trainer.push_to_hub does to the card (model_name = the repo's name without its owner, the script's
    tags): the card's loading code names the whole repo id, and no tag is listed twice."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "emissions.csv").write_text(EMISSIONS_CSV)
    (output_dir / "all_results.json").write_text(json.dumps(RESULTS))
    model = hf_dbp.ViTMAEDBPForPreTraining(hf_dbp.ViTMAEDBPConfig(**TINY_MODEL))
    args = hf_dbp.DBPTrainingArguments(
        output_dir=str(output_dir), report_to="none", use_cpu=True, hub_model_id="me/x", emissions_country="FRA"
    )
    trainer = hf_dbp.DBPTrainer(model=model, args=args)
    trainer.create_model_card(model_name="x", tags=["dbp", "mae", "vision-transformer", "image-pretraining", "new"])
    card = load_card(output_dir)
    assert 'from_pretrained("me/x")' in card.text, card.text
    assert card.data.model_name == "me/x"
    assert len(card.data.tags) == len(set(card.data.tags)), card.data.tags
    assert "new" in card.data.tags
    assert card.data.co2_eq_emissions["emissions"] == pytest.approx(EMISSIONS_G, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# 7. --push_to_hub offline fails before training


@pytest.mark.parametrize("script", ["mae", "segmentation"])
def test_push_to_hub_offline_fails_before_anything(cli, script):
    """With --push_to_hub and HF_HUB_OFFLINE=1 the scripts stop at once: the error names the Hub and the local
    alternative (`hf-dbp push`), and nothing was loaded, trained or saved (the data and checkpoint given do not even
    exist: any later step would fail with another error)."""
    result = cli.results[f"{script}_push_offline"]
    assert_exit(result, success=False)
    error = result.stdout.strip().splitlines()[-1]
    assert error.startswith(f"run_{'mae_dbp' if script == 'mae' else script}.py: error: "), result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    assert "Hugging Face Hub" in error and "HF_HUB_OFFLINE" in error
    assert "hf-dbp push" in error and "locally" in error
    assert "Process rank" not in result.stdout and "{'loss'" not in result.stdout  # no log line: nothing started
    output_dir = cli.root / f"{script}_out"
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.parametrize("command", ["merge", "push"])
@pytest.mark.parametrize("where", ["missing", "outputs/run/missing", "empty_folder", "a_file"])
def test_cli_names_the_missing_local_folder_before_the_hub(tmp_path, monkeypatch, capsys, command, where):
    """`hf-dbp merge/push` of a folder that is not there (or holds no model) says so, naming it, before any Hub
    message (offline here: a Hub check first would report HF_HUB_OFFLINE instead)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "a_file").write_text("not a model")
    path = where if where != "missing" else "./missing"
    argv = ["merge", path, str(tmp_path / "out")] if command == "merge" else ["push", path, "me/model"]
    assert cli_main(argv) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"hf-dbp {command}: ") and path in message, message
    assert "Repo id" not in message and "HF_HUB_OFFLINE" not in message, message
    assert any(words in message for words in ("no such folder", "no config.json", "is a file")), message
    assert not (tmp_path / "out").exists()


def test_merge_a_bare_name_that_is_neither_folder_nor_hub_model_says_both(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable when it was imported: without this the lookup waits for the network's timeouts.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli_main(["merge", "mae-dbp-demo", "out"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "mae-dbp-demo" in message and "no such folder here" in message and "Hub" in message, message


def test_a_local_card_loads_from_anywhere_and_the_pushed_card_names_the_repo_id(tmp_path, monkeypatch):
    """The card's loading code works where the card is read: locally the folder's absolute path (run from another
    directory here), on the Hub the repo id (push_folder rewrites the card it finds)."""
    import re

    from transformers import AutoConfig, AutoModelForPreTraining

    from hf_dbp.training.model_card import write_model_card

    folder = make_run_folder(tmp_path / "run")
    write_model_card(str(folder), AutoConfig.from_pretrained(folder))
    loaded_from = re.findall(
        r'AutoModelForPreTraining\.from_pretrained\("([^"]+)"\)', (folder / "README.md").read_text()
    )
    assert loaded_from and set(loaded_from) == {str(folder.resolve())}, loaded_from
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert type(AutoModelForPreTraining.from_pretrained(loaded_from[0])).__name__ == "ViTMAEDBPForPreTraining"

    api = FakeHubApi(tmp_path / "hub")
    push_folder(str(folder), "me/run", api=api)
    pushed = (tmp_path / "hub" / "me" / "run" / "README.md").read_text()
    assert 'from_pretrained("me/run")' in pushed and str(folder.resolve()) not in pushed, pushed


def test_merge_keeps_the_data_steps_time_and_dbp_settings_of_the_card_it_merges(tmp_path):
    from hf_dbp.training.model_card import write_model_card

    model = make_dbp_checkpoint(tmp_path / "dbp")
    write_model_card(
        str(tmp_path / "dbp"),
        model.config,
        datasets=["imagenet-1k", "my photos in /data/imgs"],
        steps=1234,
        training_seconds=5678.5,
    )
    assert cli_main(["merge", str(tmp_path / "dbp"), str(tmp_path / "merged")]) == 0
    card = load_card(tmp_path / "merged")
    assert "| data | imagenet-1k, my photos in /data/imgs |" in card.text, card.text
    assert "| optimizer steps | 1234 |" in card.text and "| training time | 5678.5 s" in card.text
    assert f"| decorrelation lr | {model.config.decorrelation_lr} |" in card.text and "folded" in card.text
    assert card.data.datasets == ["imagenet-1k"]  # Hub ids only in the metadata; the description in the text


def test_card_metadata_keeps_only_hub_dataset_ids(tmp_path):
    from hf_dbp.training.model_card import hub_dataset_ids

    (tmp_path / "imgs").mkdir()
    local = str(tmp_path / "imgs")
    assert hub_dataset_ids(
        [
            "scene_parse_150",
            "me/photos",
            local,
            "scikit-image photographs (hf-dbp demo)",
            "ADE20K layout: /data/ADE",
            "a/b/c",
        ]
    ) == ["scene_parse_150", "me/photos"]


def test_push_rewrites_absolute_paths_in_loading_calls_only(tmp_path):
    """The card's loading calls that name an absolute path (this folder's, or where it was written before it was
    moved; `from_pretrained` or `load_decorrelated`) name the repo id once pushed; a relative path or a Hub id in the
    user's own text stays."""
    folder = make_run_folder(tmp_path / "run")
    (folder / "README.md").write_text(
        'model = hf_dbp.load_decorrelated(AutoModelForCausalLM, "/somewhere/else/out")\n'
        'model = AutoModelForPreTraining.from_pretrained("/old/place", trust_remote_code=True)\n'
        'tokenizer = AutoTokenizer.from_pretrained("./my_tokenizer")\n'
        'base = ViTMAEModel.from_pretrained("facebook/vit-mae-base")\n'
    )
    push_folder(str(folder), "me/run", api=FakeHubApi(tmp_path / "hub"))
    assert (tmp_path / "hub" / "me" / "run" / "README.md").read_text().splitlines() == [
        'model = hf_dbp.load_decorrelated(AutoModelForCausalLM, "me/run")',
        'model = AutoModelForPreTraining.from_pretrained("me/run", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("./my_tokenizer")',
        'base = ViTMAEModel.from_pretrained("facebook/vit-mae-base")',
    ]
