"""examples/run_clm_dbp.py: causal language modelling with DBP on real text, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, offline_env
from test_distributed import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_dbp
from hf_dbp import cli
from hf_dbp.core.model import decorrelation_modules
from hf_dbp.tasks.text_data import (
    DEFAULT_TRAIN_PLAYS,
    DEFAULT_VALIDATION_PLAYS,
    HELDOUT_TRAIN_PLAYS,
    HELDOUT_VALIDATION_PLAYS,
    demo_text_dataset,
)

SCRIPT = REPO_ROOT / "examples" / "run_clm_dbp.py"
TINY_LLAMA = (
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=2,intermediate_size=48,"
    "max_position_embeddings=64"
)
TINY_GPT2 = "n_embd=32,n_layer=2,n_head=2,n_positions=64"


def run_clm(tmp_path, *flags, timeout=300, expect_ok=True):
    command = [
        sys.executable,
        str(SCRIPT),
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--tokenizer_vocab_size",
        "300",
        "--block_size",
        "32",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--logging_steps",
        "2",
        "--track_emissions",
        "false",
        *flags,
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=timeout
    )
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def messy_text_files(tmp_path):
    """A user's own text: blank lines, very long and very short lines, non-ASCII, a validation file of its own."""
    train = tmp_path / "train.txt"
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog, café ünïcödé {i % 7}." for i in range(300)]
    lines[10:10] = ["", "", "x", "word " * 200]
    train.write_text("\n".join(lines), encoding="utf-8")
    validation = tmp_path / "validation.txt"
    validation.write_text("\n".join(f"Another line {i} about foxes and dogs." for i in range(80)), encoding="utf-8")
    return train, validation


def users_text_run(root: Path) -> None:
    train, validation = messy_text_files(root)
    run_clm(
        root,
        "--train_file",
        str(train),
        "--validation_file",
        str(validation),
        "--model_type",
        "gpt2",
        "--config_overrides",
        TINY_GPT2,
        "--max_steps",
        "6",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "3",
        "--output_dir",
        str(root / "out"),
        "--decorrelation_lr",
        "1e-2",
    )


def bp_runs(root: Path) -> None:
    """BP from scratch, then a DBP checkpoint made from it continued as BP (R folded in)."""
    train, validation = messy_text_files(root)
    common = [
        "--train_file",
        str(train),
        "--validation_file",
        str(validation),
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
    ]
    run_clm(
        root,
        *common,
        "--model_type",
        "llama",
        "--config_overrides",
        TINY_LLAMA,
        "--bp_baseline",
        "--output_dir",
        str(root / "bp"),
    )
    # A published DBP checkpoint continued: as BP (its R folded in), and as DBP with a new decorrelation lr.
    model = hf_dbp.decorrelate(AutoModelForCausalLM.from_pretrained(root / "bp"))
    model.save_pretrained(root / "dbp")
    AutoTokenizer.from_pretrained(root / "bp").save_pretrained(root / "dbp")
    run_clm(
        root,
        *common,
        "--model_name_or_path",
        str(root / "dbp"),
        "--bp_baseline",
        "--output_dir",
        str(root / "dbp-then-bp"),
    )


RESUME_FLAGS = [
    "--model_type",
    "llama",
    "--config_overrides",
    TINY_LLAMA,
    "--max_steps",
    "4",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--decorrelation_lr",
    "1e-2",
]


def resumed_runs(root: Path) -> subprocess.CompletedProcess:
    """4 steps in one go, then the same from the first's checkpoint at step 2; returns the resumed run."""
    train, validation = messy_text_files(root)
    common = ["--train_file", str(train), "--validation_file", str(validation), *RESUME_FLAGS]
    run_clm(root, *common, "--output_dir", str(root / "whole"))
    return run_clm(
        root,
        *common,
        "--output_dir",
        str(root / "part"),
        "--resume_from_checkpoint",
        str(root / "whole" / "checkpoint-2"),
    )


def comparison_run(root: Path) -> subprocess.CompletedProcess:
    train, validation = messy_text_files(root)
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "compare_bp_dbp_clm.py"),
        "--output_dir",
        str(root / "cmp"),
        "--train_file",
        str(train),
        "--validation_file",
        str(validation),
        "--seeds",
        "0",
        "--config_overrides",
        TINY_LLAMA,
        "--block_size",
        "32",
        "--tokenizer_vocab_size",
        "300",
        "--max_steps",
        "4",
        "--eval_steps",
        "2",
        "--max_eval_samples",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--warmup_steps",
        "1",
        "--optimizers",
        "adamw",
        "muon",
        "--optimizer_learning_rates",
        "muon=2e-3",
    ]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=offline_env(root / "hf"), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """The script's runs that the tests below inspect, started together, as many at a time as there are cores (each
    runs on one; the comparison's own runs follow each other). name -> (what its function returned, its folder)."""
    base = tmp_path_factory.mktemp("clm_runs")
    jobs = {"comparison": comparison_run, "resumed": resumed_runs, "users_text": users_text_run, "bp": bp_runs}
    for name in jobs:
        (base / name).mkdir()
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(job, base / name) for name, job in jobs.items()}
        return {name: (future.result(), base / name) for name, future in futures.items()}


def test_dbp_on_a_users_text_files_then_load_merge_and_generate(runs, tmp_path):
    _, root = runs["users_text"]
    out = root / "out"
    results = json.loads((out / "all_results.json").read_text())
    assert results["perplexity"] == pytest.approx(2.718281828 ** results["eval_loss"], rel=1e-6)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(r["decorrelation_loss"] > 0 for r in history if "loss" in r)
    card = (out / "README.md").read_text()
    assert "hf_dbp.load_decorrelated(AutoModelForCausalLM" in card and "co2_eq_emissions" not in card
    assert (out / "training_curves.png").is_file() and (out / "tokenizer.json").is_file()

    model = hf_dbp.load_decorrelated(AutoModelForCausalLM, out)
    assert len(decorrelation_modules(model)) == 8 and type(model).__name__ == "GPT2LMHeadModel"
    assert any(not torch.equal(d.R, torch.eye(d.dim)) for d in decorrelation_modules(model))
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the quick brown fox", return_tensors="pt")
    merged = hf_dbp.merge_decorrelation(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, model.eval()(**ids).logits, rtol=1e-4, atol=1e-4)
    generated = pipeline("text-generation", model=merged, tokenizer=tokenizer)(
        "the quick", max_new_tokens=4, do_sample=False
    )
    assert generated[0]["generated_text"].startswith("the quick")

    # `hf-dbp merge`: a plain checkpoint with its tokenizer and card, for transformers alone.
    assert cli.main(["merge", str(out), str(tmp_path / "merged")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, model(**ids).logits, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("fox").input_ids == tokenizer("fox").input_ids
    assert "AutoModelForCausalLM.from_pretrained" in (tmp_path / "merged" / "README.md").read_text()
    assert cli.main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 1  # no R left to fold


def test_bp_baseline_is_a_plain_checkpoint_and_a_dbp_checkpoint_continues_as_bp_merged(runs):
    _, root = runs["bp"]
    config = json.loads((root / "bp" / "config.json").read_text())
    assert "decorrelation" not in config
    history = json.loads((root / "bp" / "trainer_state.json").read_text())["log_history"]
    assert any(r.get("decorrelation_loss", 0) > 0 for r in history)  # the BP run measures the same figure
    AutoModelForCausalLM.from_pretrained(root / "bp")  # plain transformers
    dbp = root / "dbp"
    assert "decorrelation" not in json.loads((root / "dbp-then-bp" / "config.json").read_text())
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import run_clm_dbp

    continued = run_clm_dbp.build_model(
        run_clm_dbp.ModelArguments(model_name_or_path=str(dbp)),
        run_clm_dbp.DBPArguments(decorrelation_lr=0.02),
        tokenizer=None,
    )
    assert continued.config.decorrelation["lr"] == 0.02 and decorrelation_modules(continued)


def test_resumed_run_ends_with_the_uninterrupted_runs_R(runs):
    resumed, root = runs["resumed"]
    # It went on from step 2: one training record (step 4, logging every 2), not two.
    assert (resumed.stdout + resumed.stderr).count("{'loss':") == 1
    whole = hf_dbp.load_decorrelated(AutoModelForCausalLM, root / "whole")
    part = hf_dbp.load_decorrelated(AutoModelForCausalLM, root / "part")
    for a, b in zip(decorrelation_modules(whole), decorrelation_modules(part), strict=True):
        torch.testing.assert_close(a.R, b.R, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a.R, torch.eye(a.dim))


def test_two_processes_end_with_the_same_R(tmp_path):
    train, validation = messy_text_files(tmp_path)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2_processes.yaml"),
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        "--train_file",
        str(train),
        "--validation_file",
        str(validation),
        "--model_type",
        "llama",
        "--config_overrides",
        TINY_LLAMA,
        "--max_steps",
        "3",
        "--block_size",
        "32",
        "--tokenizer_vocab_size",
        "300",
        "--per_device_train_batch_size",
        "2",
        "--eval_strategy",
        "no",
        "--report_to",
        "none",
        "--track_emissions",
        "false",
        "--output_dir",
        str(tmp_path / "ddp"),
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "R identical on all 2 processes" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("flags", "message", "known_from_arguments"),
    [
        (["--train_file", "missing.txt"], "--train_file missing.txt does not exist", True),
        (["--train_file", "TRAIN.parquet"], "must be a .txt, .csv, .json or .jsonl file", True),
        (["--decorrelation_kappa", "3"], "kappa must be a number in", True),
        (["--model_type", "distilbert"], "no default target modules for model type 'distilbert'", True),
        (
            ["--model_type", "llama", "--config_overrides", TINY_LLAMA, "--block_size", "128"],
            "--block_size 128 is longer than the model's 64 positions",
            False,
        ),
    ],
)
def test_bad_arguments_fail_early_and_name_the_problem(tmp_path, monkeypatch, flags, message, known_from_arguments):
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import run_clm_dbp

    train, _ = messy_text_files(tmp_path)
    (tmp_path / "TRAIN.parquet").write_text("not a parquet file")
    flags = [str(tmp_path / "TRAIN.parquet") if f == "TRAIN.parquet" else f for f in flags]
    if "--train_file" not in flags:
        flags = ["--train_file", str(train), *flags]
    monkeypatch.setattr(
        sys, "argv", [str(SCRIPT), *flags, "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    )
    if known_from_arguments:  # an error the arguments already show comes before any data is read
        monkeypatch.setattr(run_clm_dbp, "load_text", lambda *a: pytest.fail("the data was read"))
    with pytest.raises(ValueError, match=re.escape(message)):
        run_clm_dbp.main()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_embedded_text_sets_are_real_english_and_share_nothing():
    default, heldout, docs = (demo_text_dataset(s) for s in ("default", "heldout_plays", "heldout_python_docs"))
    plays = [
        set(DEFAULT_TRAIN_PLAYS),
        set(DEFAULT_VALIDATION_PLAYS),
        set(HELDOUT_TRAIN_PLAYS),
        set(HELDOUT_VALIDATION_PLAYS),
    ]
    assert sum(len(p) for p in plays) == len(set().union(*plays))  # no play in two places
    assert len("".join(default["train"]["text"])) > 1_000_000 and any(
        t.startswith("HAMLET.\n") for t in default["train"]["text"]
    )
    texts = [set(ds[split]["text"]) for ds in (default, heldout, docs) for split in ("train", "validation")]
    long = [{t for t in s if len(t) > 200} for s in texts]  # short lines (speaker names, "Exeunt") do recur
    assert all(not (a & b) for i, a in enumerate(long) for b in long[i + 1 :])
    assert not any("**" in t for t in default["train"]["text"][:2000])  # markdown removed
    assert any("for" in t and "statement" in t for t in docs["train"]["text"])


def test_text_comparison_end_to_end(runs):
    result, root = runs["comparison"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    comparison = json.loads((root / "cmp" / "comparison.json").read_text())
    (run,) = comparison["runs"]
    assert [e["step"] for e in run["bp"]["evals"]] == [2, 4] == [e["step"] for e in run["dbp"]["evals"]]
    assert run["bp"]["train"][0]["decorrelation_loss"] == pytest.approx(
        run["dbp"]["train"][0]["decorrelation_loss"], rel=0.5
    )
    assert "decorrelation" in json.loads((root / "cmp" / "seed0" / "dbp" / "config.json").read_text())
    assert "decorrelation" not in json.loads((root / "cmp" / "seed0" / "bp" / "config.json").read_text())
    assert (root / "cmp" / "comparison.md").is_file() and (root / "cmp" / "comparison.png").is_file()
    # --optimizers: BP and DBP with Muon too, at the rate given for it, each DBP against the BP of its optimizer.
    assert comparison["methods"] == ["bp", "dbp", "bp_muon", "dbp_muon"]
    assert set(run["comparisons"]) == {"dbp", "dbp_muon"}
    assert {run[m]["optimizer"] for m in ("bp_muon", "dbp_muon")} == {"muon"} and run["dbp"]["optimizer"] == "adamw"
    assert run["bp_muon"]["learning_rate"] == run["dbp_muon"]["learning_rate"] == 2e-3 != run["bp"]["learning_rate"]
    muon_args = json.loads((root / "cmp" / "seed0" / "dbp_muon" / "all_results.json").read_text())
    assert (
        muon_args["eval_loss"]
        != json.loads((root / "cmp" / "seed0" / "dbp" / "all_results.json").read_text())["eval_loss"]
    )
    card = (root / "cmp" / "seed0" / "dbp" / "README.md").read_text()  # emissions measured: on the card
    assert (
        "co2_eq_emissions" in card
        and "| emissions |" in card
        and "decorrelated layers | 14, sharing 8 matrices R" in card
    )
