import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MAE_SCRIPT = REPO_ROOT / "examples" / "run_mae_dbp.py"
SEGMENTATION_SCRIPT = REPO_ROOT / "examples" / "run_segmentation.py"


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group (tests may run beside each other)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, *args, processes: int = 2) -> list[str]:
    """The command that runs `script` with `args` on `processes` local processes under torchrun, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]


TINY = dict(
    image_size=16,
    patch_size=4,
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)
"""A ViTMAE small enough for exact checks in milliseconds: 16 patches of 4x4x3 = 48 values, width 24."""
TINY_ENCODER = {**TINY, "num_hidden_layers": 4}
"""The same with 4 blocks, the fewest the segmentation backbone's 4-level neck takes."""


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


def randomise_R(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Move every R of `model` away from the identity by Gaussian noise (its own generator: the global RNG stays)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in model.decorrelation_modules():
            d.R.add_(scale * torch.randn(d.R.shape, generator=generator))


def load_script(path: str, name: str | None = None):
    """A script of the repository (`"examples/run_mae_dbp.py"`, `"benchmarks/scaling.py"`) as a module, loaded once
    and kept in `sys.modules` (its dataclasses look their module up there)."""
    name = name or f"script_{Path(path).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def training_records(output_dir: Path) -> list[dict]:
    """The training log records (the ones with a train loss) of a run's trainer_state.json."""
    return [r for r in read_json(output_dir / "trainer_state.json")["log_history"] if "loss" in r]


def offline_env(hf_home: Path, offline: bool = True) -> dict[str, str]:
    """The environment for running a script in a subprocess: its own Hugging Face cache, offline, one thread.

    One thread: the test models are tiny, and torch's thread pool slows a hundredfold when other processes share
    the cores. Unbuffered: the log (stdout) and a traceback (stderr) keep the order they were written in.
    """
    env = {**os.environ, "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@dataclass
class Run:
    """A finished run of an example script: the process (stdout and stderr merged) and its output folder."""

    result: subprocess.CompletedProcess
    output_dir: Path

    @property
    def output(self) -> str:
        return self.result.stdout

    def assert_succeeded(self) -> None:
        assert self.result.returncode == 0, f"the run failed (exit {self.result.returncode}):\n{self.output[-6000:]}"
