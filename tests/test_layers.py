"""The layers of the package point one way (cli > tasks > training > models > core > target_modules): import-linter's
contract in pyproject.toml, checked by `lint-imports` as CI does, so that the README's test command checks it too."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_from_a_higher_layer_breaks_the_contract(tmp_path):
    """The check can fail: a copy of the package in which core imports from training (here through the package's
    front, `import hf_dbp`, which imports every layer) is reported, with the chain."""
    shutil.copytree(ROOT / "hf_dbp", tmp_path / "hf_dbp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    sampling = tmp_path / "hf_dbp" / "core" / "sampling.py"
    sampling.write_text(sampling.read_text() + "\n\ndef _late():\n    import hf_dbp  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "0 kept, 1 broken" in result.stdout, result.stdout[-4000:]
    assert "hf_dbp.core is not allowed to import hf_dbp.training" in result.stdout
    assert "hf_dbp.core.sampling -> hf_dbp" in result.stdout
