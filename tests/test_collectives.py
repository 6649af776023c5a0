"""What DBP's step sends between processes and how often it reads the device (hf_dbp.core.collectives).

The collectives and every tensor-to-Python conversion are intercepted: the counts are those of the real step, on two
real processes (gloo), checked against an independent computation of R over both processes' rows.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_dbp.core import collectives
from hf_dbp.core.collectives import symmetric_from_upper_triangle, upper_triangle
from hf_dbp.core.decorrelation import Decorrelation, decorrelation_step

WIDTHS = {"wide": 64, "middle": 24, "narrow": 6, "idle_on_one": 40, "idle": 8}
LR, KAPPA = 0.1, 0.2


def rows_of(name: str, rank: int, step: int) -> torch.Tensor:
    """The rows layer `name` sees on process `rank` at `step`: few for the wide layers, many for the narrow one."""
    count = {"wide": 7 + 2 * rank, "middle": 8 + 2 * rank, "narrow": 30 + rank, "idle_on_one": 5 if rank == 0 else 0,
             "idle": 0}[name]  # fmt: skip
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + len(name))
    return torch.randn(count, WIDTHS[name], generator=generator, dtype=torch.float64) * 1.5


def reference_update(R, rows, lr=LR, kappa=KAPPA):
    z = rows @ R.T
    X = z.T @ z / z.shape[0]
    C = X - torch.diag(torch.diagonal(X))
    v = torch.diagonal(X) - 1
    return R - lr * ((1 - kappa) * C @ R + kappa * torch.diag(v) @ R)


class Reads:
    """Counts tensor-to-Python conversions (each a host sync on an accelerator), with the function that asked."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        self.callers: list[str] = []
        self._originals = {}

    def __enter__(self):
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)
            self._originals[method] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.callers.append(traceback.extract_stack(limit=2)[0].name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, counted)
        return self

    def __exit__(self, *exc):
        for method, original in self._originals.items():
            setattr(torch.Tensor, method, original)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent: list[tuple[str, int]] = []
    originals = {name: getattr(collectives, name) for name in ("_all_gather_single",)}
    all_reduce = dist.all_reduce

    def gather(output, tensor, *args, **kwargs):
        sent.append(("all_gather", tensor.numel()))
        return originals["_all_gather_single"](output, tensor, *args, **kwargs)

    def reduce(tensor, *args, **kwargs):
        sent.append(("all_reduce", tensor.numel()))
        return all_reduce(tensor, *args, **kwargs)

    collectives._all_gather_single, dist.all_reduce = gather, reduce
    try:
        modules = {name: Decorrelation(width, sample_fraction=1.0).double() for name, width in WIDTHS.items()}
        reads, per_step_sent = [], []
        for step in range(2):
            for name, module in modules.items():
                rows = rows_of(name, rank, step)
                if rows.shape[0]:
                    module.observe(rows)  # z = R x of these rows, with this process's (shared) R
            sent.clear()
            with Reads() as counter:
                decorrelation_step(list(modules.values()), lr=LR, kappa=KAPPA)
            reads.append(counter.callers)
            per_step_sent.append(list(sent))
        results[rank] = {"R": {n: m.R.clone() for n, m in modules.items()}, "reads": reads, "sent": per_step_sent}
    finally:
        collectives._all_gather_single, dist.all_reduce = originals["_all_gather_single"], all_reduce
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    return dict(results)


def test_R_is_identical_on_both_processes_and_equal_to_one_computation_over_all_rows(two_processes):
    for name in WIDTHS:
        assert torch.equal(two_processes[0]["R"][name], two_processes[1]["R"][name]), name
    for name, width in WIDTHS.items():
        R = torch.eye(width, dtype=torch.float64)
        for step in range(2):
            x = torch.cat([rows_of(name, rank, step) for rank in (0, 1)])
            if x.shape[0]:
                R = reference_update(R, x)
        torch.testing.assert_close(two_processes[0]["R"][name], R, rtol=1e-10, atol=1e-12)
    assert torch.equal(two_processes[0]["R"]["idle"], torch.eye(WIDTHS["idle"], dtype=torch.float64))


def test_only_what_the_update_needs_is_sent(two_processes):
    """Rows where they are fewer numbers (P x the most rows of a process < d), padded to that most; else the upper
    triangle of z^T z; and the row counts. Not the d x d matrices of every layer. "middle" sends rows (2 x 10 < 24)
    but updates from z^T z formed from them (2 N = 36 >= 24: the cheaper update from that many rows)."""
    padded = {"wide": 9, "middle": 10, "idle_on_one": 5}  # max rows of a process x d each
    expected = [
        ("all_gather", len(WIDTHS)),  # the row counts, over the CPU group
        ("all_gather", sum(padded[n] * WIDTHS[n] for n in padded)),
        ("all_reduce", WIDTHS["narrow"] * (WIDTHS["narrow"] + 1) // 2),  # "idle" saw no rows anywhere: nothing
    ]
    for rank in (0, 1):
        for step_sent in two_processes[rank]["sent"]:
            assert step_sent == expected
    sent = sum(numel for _, numel in expected)
    full_matrices = sum(d * d + 1 for d in WIDTHS.values())  # what the step sent before: every X and every count
    assert sent < 0.25 * full_matrices, (sent, full_matrices)


def test_the_step_reads_the_device_once(two_processes):
    """One read for every layer's loss and guard decision together; the counts are read from the CPU group."""
    for rank in (0, 1):
        for callers in two_processes[rank]["reads"]:
            assert sorted(callers) == ["_gather_counts", "decorrelation_step"], callers


def test_one_process_reads_once_for_any_number_of_layers():
    torch.manual_seed(0)
    modules = [Decorrelation(width, sample_fraction=0.5) for width in (4, 16, 64, 8, 32)]
    for module in modules:
        module.observe(torch.randn(40, module.dim))
    modules[2].R.data.fill_(float("nan"))  # a diverged R: the guard refuses its update, on the device
    with Reads() as counter:
        loss = decorrelation_step(modules, lr=0.1, kappa=0.1)
    assert counter.callers == ["decorrelation_step"]
    assert [m.skipped_updates for m in modules] == [0, 0, 1, 0, 0] and loss is not None
    assert torch.isnan(modules[2].R).all() and all(torch.isfinite(m.R).all() for i, m in enumerate(modules) if i != 2)


def test_upper_triangle_round_trip():
    torch.manual_seed(0)
    a = torch.randn(7, 7)
    symmetric = a + a.T
    values = upper_triangle(symmetric)
    assert values.numel() == 7 * 8 // 2
    assert torch.equal(symmetric_from_upper_triangle(values, 7), symmetric)


def test_dbp_trainer_reads_the_device_once_per_optimizer_step(tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining

    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
    ))  # fmt: skip
    data = Dataset.from_dict({"pixel_values": torch.randn(16, 3, 16, 16).numpy()}).with_format("torch")
    args = TrainingArguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                             logging_steps=100, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                             dataloader_num_workers=0)  # fmt: skip
    trainer = DBPTrainer(model=model, args=args, train_dataset=data, track_emissions=False)
    update, reads = trainer._decorrelation_update, []

    def counted():
        with Reads() as counter:
            update()
        reads.append(counter.callers)

    monkeypatch.setattr(trainer, "_decorrelation_update", counted)
    trainer.train()
    assert reads == [["decorrelation_step"]] * 3
