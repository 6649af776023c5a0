"""DBP under sharding engines: FSDP2 (2 CPU processes, launched with examples/accelerate_configs/fsdp2.yaml) and
DeepSpeed ZeRO-2 and ZeRO-3 through DBPTrainer (2 CPU processes); R stays whole, out of every optimizer, and the same
on every process. The launched runs are tests/fsdp2_worker.py and tests/deepspeed_worker.py."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils.fsdp_utils import get_parameters_from_modules
from conftest import TINY, free_port, offline_env, torchrun
from safetensors.torch import load_file
from test_distributed import reference_update

import hf_dbp
from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.core.layers import DECORRELATED_LAYERS, clear_folded_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate_configs"


def launch(command: list, tmp_path: Path) -> str:
    result = subprocess.run(
        command, cwd=ROOT, env=offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def tiny_model(**overrides) -> ViTMAEDBPForPreTraining:
    torch.manual_seed(0)
    return ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**TINY, **overrides))


@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp2.yaml"])
def test_accelerate_configs_leave_out_exactly_the_decorrelation_matrices(config):
    """Accelerate's own conversion of the file's fsdp_ignored_modules (what FSDP1 and FSDP2 are given) names every R
    and nothing else."""
    fsdp = yaml.safe_load((CONFIGS / config).read_text())["fsdp_config"]
    assert fsdp["fsdp_ignored_modules"] == hf_dbp.FSDP_IGNORED_MODULES
    assert fsdp["fsdp_version"] == (2 if config == "fsdp2.yaml" else 1)
    model = tiny_model()
    ignored = get_parameters_from_modules(fsdp["fsdp_ignored_modules"], model, None)
    assert ignored == hf_dbp.fsdp_ignored_params(model)
    assert {id(p) for p in ignored} == {id(d.R) for d in model.decorrelation_modules()} and len(ignored) == 9
    # Any model decorrelated with hf_dbp.decorrelate names its R the same way.
    plain = torch.nn.ModuleDict({"block": torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 4)})})
    hf_dbp.decorrelate(plain, hf_dbp.DecorrelationConfig(target_modules=["fc"]))
    names = [n for n, _ in plain.named_modules() if re.fullmatch(hf_dbp.FSDP_IGNORED_MODULES, n)]
    assert names == ["block.fc.fc_decorrelation"]  # in a ModuleDict the layer itself holds its R (core/inject.py)


def test_prepare_for_deepspeed_makes_R_a_buffer_under_the_same_key(tmp_path):
    model = tiny_model(decorrelation_sample_fraction=1.0)
    with torch.no_grad():
        for d in model.decorrelation_modules():
            d.R.add_(0.01 * torch.randn(d.R.shape))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pixels, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    expected = model(pixels, noise=noise).loss
    assert hf_dbp.prepare_for_deepspeed(model) is model
    assert hf_dbp.fsdp_ignored_params(model) == set()
    assert not any(n.endswith("_decorrelation.R") for n, _ in model.named_parameters())
    assert sum(n.endswith("_decorrelation.R") for n, _ in model.named_buffers()) == 9
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(model(pixels, noise=noise).loss, expected)
    hf_dbp.prepare_for_deepspeed(model)  # twice is once
    assert hf_dbp.decorrelation_step(model) > 0  # the step updates the buffers in place
    R = model.vit.layers[0].attention.qkv_decorrelation.R
    assert R.dtype == torch.float32 and not torch.equal(R, before["vit.layers.0.attention.qkv_decorrelation.R"])
    model.to(torch.bfloat16)
    R = model.vit.layers[0].attention.qkv_decorrelation.R
    assert R.dtype == torch.float32  # R never drops below float32, as a parameter or a buffer
    model.float().save_pretrained(tmp_path / "saved")
    loaded = hf_dbp.load_decorrelated(ViTMAEDBPForPreTraining, tmp_path / "saved")
    assert torch.equal(loaded.vit.layers[0].attention.qkv_decorrelation.R, R)


def test_loading_weights_drops_the_cached_folds():
    """A sharding engine gathers W afresh for every forward (same version counter, maybe the same memory): the fold
    cached from the old W must go when weights are loaded, through the modules or behind their back."""
    model = tiny_model().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(16, 3, 16, 16), noise=torch.rand(16, 16))
    cached = [m for m in model.modules() if isinstance(m, DECORRELATED_LAYERS) and m._folded_cache is not None]
    assert len(cached) > 8
    model.load_state_dict(state)
    assert all(m._folded_cache is None for m in cached)
    with torch.no_grad():
        model(torch.randn(16, 3, 16, 16), noise=torch.rand(16, 16))
    assert any(m._folded_cache is not None for m in cached)
    clear_folded_weights(model)
    assert all(m._folded_cache is None for m in cached)


def test_dbp_trainer_says_when_an_fsdp_config_gave_no_sharding(tmp_path, monkeypatch, caplog):
    """What `accelerate launch --config_file fsdp2.yaml` gives on a machine without GPUs: the FSDP settings in the
    environment, and a Trainer without FSDP (accelerate enables it for GPUs only)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    data = Dataset.from_dict({"pixel_values": torch.randn(4, 3, 16, 16).numpy()}).with_format("torch")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    with caplog.at_level("WARNING", logger="hf_dbp"):
        trainer = hf_dbp.DBPTrainer(model=tiny_model(), args=args, train_dataset=data)
    assert not trainer.is_fsdp_enabled
    assert "accelerate was given an FSDP config, but this run is not sharded" in caplog.text


def test_fsdp2_with_R_left_out_trains_as_an_unsharded_model(tmp_path):
    """examples/accelerate_configs/fsdp2.yaml on 2 CPU processes, the model sharded by accelerate's fsdp2_prepare_model
    with the plugin accelerate built from the file, DBP attached to the optimizer, 2 micro-batches per step: gradients,
    outputs and R follow an unsharded model trained on both processes' data, and R is whole and identical on both."""
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "fsdp2.yaml"),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--main_process_port",
            str(free_port()),
            str(ROOT / "tests" / "fsdp2_worker.py"),
            str(tmp_path),
        ],
        tmp_path,
    )
    ranks = [torch.load(tmp_path / f"fsdp2_rank{r}.pt") for r in (0, 1)]
    run = ranks[0]
    assert run["ignored"] == 9 and run["R_types"] == ["Parameter"]  # whole tensors, not DTensor shards
    assert run["sharded_blocks"] >= 3 and run["weight_shard"] == (576, 1152)  # the weights are sharded
    assert not run["optimizer_holds_R"] and run["hook_steps"] == 3
    for step in range(3):
        grads, expected = run["grads"][step], run["reference_grads"][step]
        assert set(grads) == set(expected) and not any(n.endswith(".R") for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(run["outputs"][step], run["reference_outputs"][step], rtol=1e-4, atol=1e-5)
    assert run["losses"] == pytest.approx(run["reference_losses"], rel=1e-5)
    for mine, other, expected in zip(run["R"], ranks[1]["R"], run["reference_R"], strict=True):
        assert torch.equal(mine, other)
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-5)
    assert max((R - torch.eye(R.shape[0])).abs().max().item() for R in run["R"]) > 0.01
    # The whole state dict carries every R as trained; loading weights into the shards drops every cached fold.
    assert len(run["saved_R"]) == 9 and all(
        torch.equal(a, b) for a, b in zip(run["saved_R"].values(), run["R"], strict=True)
    )
    assert run["folds_before_load"] > 8 and run["folds_after_load"] == 0
    torch.testing.assert_close(run["loaded_output"], run["reference_loaded_output"], rtol=1e-5, atol=1e-6)


def test_deepspeed_zero2_and_zero3_keep_R_whole_and_update_it_from_every_process(tmp_path):
    """DBPTrainer with examples/deepspeed/zero2.json and zero3.json on 2 CPU processes, bf16, 2 micro-batches per
    step, from a checkpoint with trained R: R is loaded exactly (under ZeRO-3 transformers builds the model inside
    zero.Init), stays a whole float32 buffer out of DeepSpeed's hands, takes one step per optimizer step computed from
    the rows of both processes, and is the same on both."""
    pytest.importorskip("deepspeed")
    launch(
        torchrun(str(ROOT / "tests" / "deepspeed_worker.py"), str(tmp_path)),
        tmp_path,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    start = ranks[0]["start_R"]
    for stage, optimizer, weight_local in (
        (2, "DeepSpeedZeroOptimizer", 1152),
        (3, "DeepSpeedZeroOptimizer_Stage3", 576),
    ):
        run, other = ranks[0][stage], ranks[1][stage]
        assert run["optimizer"] == optimizer and run["weight_local"] == weight_local and run["weight_numel"] == 1152
        assert run["weight_dtype"] == "torch.bfloat16" and run["R_dtypes"] == ["torch.float32"]
        assert run["partitioned_on_load"] == 0 and run["R_parameters"] == 0
        assert all(torch.equal(a, b) for a, b in zip(run["prepared_R"], start, strict=True)), stage  # loaded exactly
        # Once per step, although ZeRO steps the torch AdamW inside once per parameter group (the Trainer makes two).
        assert run["parameter_groups"] == 2 and run["hook_steps"] == run["global_steps"] == 3
        assert all(torch.equal(a, b) for a, b in zip(run["R"], other["R"], strict=True)), stage
        assert run["losses"] == other["losses"] and len(run["losses"]) == 3
        # The DBP steps of one R recomputed here from the rows both processes' q/k/v read (2 micro-batches each).
        R = start[1].double()
        for step in range(3):
            rows = torch.cat([x for rank in ranks for s, x in rank[stage]["rows"] if s == step])
            assert rows.shape[0] == 2 * 2 * 2 * 5  # processes x micro-batches x images x (cls + 4 visible patches)
            R = reference_update(R, rows)
        torch.testing.assert_close(run["qkv_R"].double(), R, rtol=0, atol=1e-5)
        assert (run["qkv_R"] - start[1]).abs().max() > 0.01
        saved = tmp_path / f"zero{stage}" / "final" / "model.safetensors"
        assert saved.is_file()  # ZeRO-3 gathers the 16-bit weights on save (the config's setting)
        saved_R = [v for k, v in load_file(saved).items() if k.endswith("_decorrelation.R")]
        assert len(saved_R) == 9 and all(v.dtype == torch.float32 for v in saved_R)
        assert any(torch.equal(v, run["qkv_R"]) for v in saved_R)
