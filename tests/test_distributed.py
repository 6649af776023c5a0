"""DBP across processes: DDP over gloo on CPU, launched with torchrun and with accelerate."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, offline_env, torchrun

ROOT = Path(__file__).resolve().parents[1]


def run(command, tmp_path, timeout=300):
    result = subprocess.run(
        command, cwd=ROOT, env=offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def reference_update(R, rows, lr=0.05, kappa=0.3):
    z = rows @ R.T
    X = z.T @ z / z.shape[0]
    C = X - torch.diag(torch.diagonal(X))
    v = torch.diagonal(X) - 1
    return R - lr * ((1 - kappa) * C @ R + kappa * torch.diag(v) @ R)


def test_torchrun_ddp_ranks_end_with_the_same_R_computed_from_all_ranks_rows(tmp_path):
    output = run(
        torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)),
        tmp_path,
    )
    assert "R identical on all 2 processes" in output
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(results[0]["R"], results[1]["R"])
    assert results[0]["losses"] == results[1]["losses"]
    # Each rank ran 3 optimizer steps of 2 micro-batches on different images.
    for result in results:
        assert [step for step, _ in result["rows"]] == [0, 0, 1, 1, 2, 2]
        assert result["begun"] == [0, 1, 2]  # after each step's second (last) micro-batch, before its backward
    assert not torch.equal(results[0]["rows"][0][1], results[1]["rows"][0][1])
    # The patch conv (folded) gave W its gradient once per step, in the last micro-batch, which DDP then averaged:
    # had it left a part out of the all-reduce, the ranks' weights would differ.
    assert all(result["deferred"] == [True] * 6 for result in results)
    assert torch.equal(results[0]["patch_weight"], results[1]["patch_weight"])
    R = torch.eye(24, dtype=torch.float64)
    for step in range(3):
        rows = torch.cat([x for result in results for s, x in result["rows"] if s == step])
        assert rows.shape[0] == 2 * 2 * 2 * 5  # ranks x micro-batches x images x (cls + 4 visible patches)
        R = reference_update(R, rows)
    torch.testing.assert_close(results[0]["R"].double(), R, rtol=1e-4, atol=1e-5)


def test_example_script_with_two_processes(tmp_path):
    output = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "examples" / "accelerate_configs" / "cpu_2_processes.yaml"),
            "--main_process_port",
            str(free_port()),
            str(ROOT / "examples" / "run_mae_dbp.py"),
            "--output_dir",
            str(tmp_path / "out"),
            "--config_overrides",
            "image_size=16,patch_size=4,hidden_size=24,num_hidden_layers=2,"
            "num_attention_heads=2,intermediate_size=48,decoder_hidden_size=16,decoder_num_hidden_layers=1,"
            "decoder_num_attention_heads=2,decoder_intermediate_size=32",
            "--max_train_samples",
            "32",
            "--max_eval_samples",
            "8",
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "3",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--track_emissions",
            "false",
        ],
        tmp_path,
    )
    assert "R identical on all 2 processes" in output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_fsdp_with_R_left_out_of_the_sharding_keeps_R_identical(tmp_path):
    run(
        torchrun(str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)),
        tmp_path,
    )
    ranks = [torch.load(tmp_path / f"fsdp_rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["ignored"] == 1 + 4 * 2  # every R found by the config's regex
    assert all(all(step) for rank in ranks for step in rank["r_grads_none"])  # with every requires_grad turned on
    assert ranks[0]["losses"] == ranks[1]["losses"] and all(loss > 0 for loss in ranks[0]["losses"])
    for a, b in zip(ranks[0]["R"], ranks[1]["R"], strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(R, torch.eye(R.shape[0])) for R in ranks[0]["R"])
    assert (
        'fsdp_ignored_modules: ".*_decorrelation"'
        in (ROOT / "examples" / "accelerate_configs" / "fsdp.yaml").read_text()
    )


def test_distributed_step_benchmark_counts_what_dbp_sends(tmp_path):
    """benchmarks/distributed_step.py on the demo model, 2 processes: real DDP steps, DBP's collectives intercepted."""
    import json

    output = tmp_path / "traffic.jsonl"
    run(
        torchrun(
            str(ROOT / "benchmarks" / "distributed_step.py"),
            "--models",
            "demo",
            "--full_step",
            "--per_device_batch",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--output",
            str(output),
        ),
        tmp_path,
    )
    result = json.loads(output.read_text())
    assert result["model"] == "demo" and result["processes"] == 2 and result["matrices_R"] == 17
    # 8 images x (1 + 16 visible) tokens x 0.1 = 14 rows per process on 96- and 384-wide R: rows, in gloo's slots.
    assert result["dbp_calls"][0] == "all_gather of 17 x 8 B"  # the row counts
    assert result["dbp_handed_ratio"] < 0.25 * result["dbp_before_ratio"]


def test_segmentation_evaluates_on_two_processes_with_images_of_other_sizes_on_each(tmp_path):
    """run_segmentation.py under accelerate with 2 processes, one validation image per process and step: the images
    of the two processes differ in width (32 x 43 and 32 x 32), and the evaluation (at each annotation's size) gathers
    them; its mean IoU and accuracy are those of the saved model evaluated on one process."""
    import json

    from conftest import TINY_ENCODER
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    import hf_dbp
    from hf_dbp.tasks.segmentation.ade20k import ade20k_id2label, load_ade20k_folder
    from hf_dbp.tasks.segmentation.demo import make_demo_ade20k
    from hf_dbp.tasks.segmentation.evaluation import predict_batch
    from hf_dbp.tasks.segmentation.metrics import SegmentationEvaluator
    from hf_dbp.tasks.segmentation.transforms import SegmentationTransform, segmentation_collate

    torch.manual_seed(0)
    hf_dbp.ViTMAEDBPForPreTraining(hf_dbp.ViTMAEDBPConfig(**TINY_ENCODER)).save_pretrained(tmp_path / "encoder")
    data = make_demo_ade20k(str(tmp_path / "ade20k"), num_train=8, num_validation=4, size=32, seed=0)
    validation = load_ade20k_folder(data)["validation"]
    assert len({row["image"].size for row in validation}) > 1
    out = tmp_path / "out"
    run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "examples" / "accelerate_configs" / "cpu_2_processes.yaml"),
            "--main_process_port",
            str(free_port()),
            str(ROOT / "examples" / "run_segmentation.py"),
            "--model_name_or_path",
            str(tmp_path / "encoder"),
            "--data_dir",
            data,
            "--output_dir",
            str(out),
            "--upernet_hidden_size",
            "16",
            "--auxiliary_channels",
            "8",
            "--crop_size",
            "32",
            "--per_device_train_batch_size",
            "2",
            "--per_device_eval_batch_size",
            "1",
            "--max_steps",
            "2",
            "--warmup_steps",
            "0",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--dataloader_num_workers",
            "0",
            "--track_emissions",
            "false",
        ],
        tmp_path,
    )
    results = json.loads((out / "all_results.json").read_text())
    model = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    transform = SegmentationTransform(32, train=False, image_processor=processor)
    batch = segmentation_collate([transform(row["image"], row["annotation"]) for row in validation])
    predictions, _ = predict_batch(model, processor, batch["pixel_values"], batch["target_sizes"], batch["labels"])
    evaluator = SegmentationEvaluator(150, ignore_index=255, id2label=ade20k_id2label())
    from transformers import EvalPrediction

    alone = evaluator(EvalPrediction(predictions=predictions, label_ids=batch["labels"]), compute_result=True)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert results[f"eval_{key}"] == pytest.approx(alone[key], abs=1e-6), key


def test_a_finished_process_leaves_before_teardown_with_its_exit_handlers_run(tmp_path):
    """`end_distributed_process` (every example script's last act under torchrun or accelerate launch): exit status 0
    on every process, the `atexit` handlers ran (they flush logs and trackers), and nothing after it runs."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import atexit, os, sys, torch, torch.distributed as dist\n"
        "from hf_dbp.tasks.scripts import end_distributed_process\n"
        "dist.init_process_group('gloo')\n"
        "out = sys.argv[1] + f'/rank{dist.get_rank()}'\n"
        "atexit.register(lambda: open(out + '.atexit', 'w').close())\n"
        "gathered = [None, None]\n"
        "dist.all_gather_object(gathered, dist.get_rank())\n"
        "end_distributed_process()\n"
        "open(out + '.after', 'w').close()\n"
    )
    run(
        torchrun(str(script), str(tmp_path)),
        tmp_path,
    )
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0.atexit", "rank1.atexit"]
