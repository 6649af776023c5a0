"""examples/compare_bp_dbp.py: the comparison arithmetic, and a tiny end-to-end run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import offline_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def compare_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_bp_dbp", ROOT / "examples" / "compare_bp_dbp.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def curve(points):
    return {"evals": [{"step": s, "train_seconds": t, "eval_loss": loss, "emissions_g": g} for s, t, loss, g in points]}


def test_time_saved_is_measured_at_bps_best_loss(compare_module):
    bp = curve([(10, 10.0, 0.9, 1.0), (20, 20.0, 0.7, 2.0), (30, 30.0, 0.6, 3.0), (40, 40.0, 0.65, 4.0)])
    bp.update(best_eval_loss=0.6, seconds_to_best=30.0, emissions_g_to_best=3.0)
    dbp = curve([(10, 12.0, 0.8, 1.2), (20, 24.0, 0.59, 2.4), (30, 36.0, 0.5, 3.6)])
    result = compare_module.compare(bp, dbp)
    assert result["dbp_seconds_to_bp_best"] == 24.0  # the first evaluation at or below 0.6
    assert result["time_saved_fraction"] == pytest.approx(1 - 24 / 30)
    assert result["emissions_saved_fraction"] == pytest.approx(1 - 2.4 / 3.0)
    never = curve([(10, 12.0, 0.8, 1.2), (20, 24.0, 0.61, 2.4)])
    assert compare_module.compare(bp, never) == {
        "dbp_seconds_to_bp_best": None, "time_saved_fraction": None, "emissions_saved_fraction": None,
    }  # fmt: skip
    assert compare_module.summarize([0.2, None, 0.4])["reached"] == "2/3"


def test_tiny_comparison_end_to_end(tmp_path):
    env = offline_env(tmp_path / "hf")
    tiny = ("image_size=16,patch_size=4,hidden_size=24,num_hidden_layers=2,num_attention_heads=2,intermediate_size=48,"
            "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32")  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compare_bp_dbp.py"), "--output_dir", str(tmp_path / "cmp"),
         "--config_overrides", tiny, "--max_steps", "4", "--eval_steps", "2", "--per_device_train_batch_size", "8",
         "--max_train_samples", "64", "--max_eval_samples", "16", "--emissions_country", "FRA"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    for method in ("bp", "dbp"):
        assert comparison[method]["best_eval_loss"] > 0 and comparison[method]["emissions_g"] > 0
        run = comparison["runs"][0][method]
        assert [e["step"] for e in run["evals"]] == [2, 4]
    assert set(comparison) >= {"time_saved_fraction", "emissions_saved_fraction", "dbp_seconds_to_bp_best", "summary"}
    assert (tmp_path / "cmp" / "seed0" / "bp" / "config.json").read_text().count('"vit_mae"') == 1
    assert "| seed |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000
