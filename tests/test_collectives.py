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
from conftest import TINY

from hf_dbp.core import collectives
from hf_dbp.core.collectives import symmetric_from_upper_triangle, upper_triangle
from hf_dbp.core.decorrelation import Decorrelation
from hf_dbp.core.model import decorrelation_step
from hf_dbp.core.step import begin_decorrelation_step

WIDTHS = {"wide": 64, "middle": 24, "narrow": 6, "idle_on_one": 40, "idle": 8}
LR, KAPPA = 0.1, 0.2


def rows_of(name: str, rank: int, step: int) -> torch.Tensor:
    """The rows layer `name` sees on process `rank` at `step`: few for the wide layers, many for the narrow one."""
    count = {
        "wide": 7 + 2 * rank,
        "middle": 8 + 2 * rank,
        "narrow": 30 + rank,
        "idle_on_one": 5 if rank == 0 else 0,
        "idle": 0,
    }[name]
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + len(name))
    return torch.randn(count, WIDTHS[name], generator=generator, dtype=torch.float64) * 1.5


BLOCKS = {"rows": (96, 32, 5), "sums": (64, 16, 30)}
"""Block-diagonal R: (width, block size, rows per process); few rows travel as rows, many as the blocks of z^T z."""


def block_rows_of(name: str, rank: int, step: int) -> torch.Tensor:
    width, _, count = BLOCKS[name]
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + 7 * width)
    return torch.randn(count + rank, width, generator=generator, dtype=torch.float64) * 1.5


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
    sent_bytes: list[int] = []
    gather_single, all_reduce, by_all_gather = (
        collectives._all_gather_single,
        dist.all_reduce,
        collectives.rows_by_all_gather,
    )

    def gather(output, tensor, *args, **kwargs):
        sent.append(("all_gather", tensor.numel()))
        sent_bytes.append(tensor.numel() * tensor.element_size())
        return gather_single(output, tensor, *args, **kwargs)

    def reduce(tensor, *args, **kwargs):
        sent.append(("all_reduce", tensor.numel()))
        sent_bytes.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    collectives._all_gather_single, dist.all_reduce = gather, reduce
    try:
        out = {}
        # Both ways rows travel: by all-gather (what NCCL gets) and in all-reduce slots (gloo's own choice).
        # And "begun": gloo's way, with the exchange started before the step (begin_decorrelation_step); "plain32"
        # and "begun32" the same two in float32, where autocast would change what begin computes. "bf16_32": float32
        # R, the statistics sent in bfloat16 (gathered rows, in "bf16_gather32"). "every2": one update, at the second
        # step, from the statistics of both.
        transports = (
            "all_gather",
            "all_reduce",
            "begun",
            "plain32",
            "begun32",
            "bf16_32",
            "bf16_gather32",
            "gather32",
            "every2",
            "blocks",  # block-diagonal R only ("blocks" in all-reduce slots, "blocks_gather" by all-gather)
            "blocks_gather",
        )
        for transport in transports:
            collectives.rows_by_all_gather = lambda group=None, _t=transport: "gather" in _t
            dtype = torch.float32 if transport.endswith("32") else torch.float64
            transfer = "bfloat16" if transport.startswith("bf16") else None
            if transport.startswith("blocks"):
                modules = {
                    name: Decorrelation(width, sample_fraction=1.0, block_size=block).to(dtype)
                    for name, (width, block, _) in BLOCKS.items()
                }
            else:
                modules = {name: Decorrelation(width, sample_fraction=1.0).to(dtype) for name, width in WIDTHS.items()}
            reads, per_step_sent, per_step_bytes = [], [], []
            for step in range(2):
                for name, module in modules.items():
                    rows = (
                        block_rows_of(name, rank, step)
                        if transport.startswith("blocks")
                        else rows_of(name, rank, step)
                    )
                    if rows.shape[0]:
                        module.observe(rows.to(dtype))  # z = R x of these rows, with this process's R
                sent.clear()
                sent_bytes.clear()
                with Reads() as counter:
                    # DBPTrainer begins inside the forward's autocast: the statistics must stay in R's precision.
                    begun = transport.startswith("begun")
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=begun):
                        pending = begin_decorrelation_step(modules.values()) if begun else None
                    update = transport != "every2" or step == 1
                    decorrelation_step(
                        list(modules.values()),
                        lr=LR,
                        kappa=KAPPA,
                        pending=pending,
                        transfer_dtype=transfer,
                        update=update,
                    )
                reads.append(counter.callers)
                per_step_sent.append(list(sent))
                per_step_bytes.append(sum(sent_bytes))
            out[transport] = {
                "R": {n: m.R.clone() for n, m in modules.items()},
                "reads": reads,
                "sent": per_step_sent,
                "bytes": per_step_bytes,
                "steps": [m.steps for m in modules.values()],
            }
        results[rank] = out
    finally:
        collectives._all_gather_single, dist.all_reduce = gather_single, all_reduce
        collectives.rows_by_all_gather = by_all_gather
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    return dict(results)


TRANSPORTS = ("all_gather", "all_reduce", "begun")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_R_is_identical_on_both_processes_and_equal_to_one_computation_over_all_rows(two_processes, transport):
    results = [two_processes[rank][transport] for rank in (0, 1)]
    for name in WIDTHS:
        assert torch.equal(results[0]["R"][name], results[1]["R"][name]), name
    for name, width in WIDTHS.items():
        R = torch.eye(width, dtype=torch.float64)
        for step in range(2):
            x = torch.cat([rows_of(name, rank, step) for rank in (0, 1)])
            if x.shape[0]:
                R = reference_update(R, x)
        torch.testing.assert_close(results[0]["R"][name], R, rtol=1e-10, atol=1e-12)
    assert torch.equal(results[0]["R"]["idle"], torch.eye(WIDTHS["idle"], dtype=torch.float64))


def triangle(name: str) -> int:
    return WIDTHS[name] * (WIDTHS[name] + 1) // 2


EXPECTED_SENT = {
    # By all-gather, rows travel while 2 processes x the most rows of one < d ("middle": 2 x 10 < 24, though its
    # update is then formed from z^T z: 2 N = 36 >= 24); each process sends the most rows x d. "idle" saw no rows
    # anywhere: nothing. "narrow" (31 rows on a 6-wide R) sends its triangle.
    "all_gather": [
        ("all_gather", len(WIDTHS)),  # the row counts, over the CPU group
        ("all_gather", 9 * WIDTHS["wide"] + 10 * WIDTHS["middle"] + 5 * WIDTHS["idle_on_one"]),
        ("all_reduce", triangle("narrow")),
    ],
    # In all-reduce slots, rows travel while 2 x 2 processes x the most rows < d, 2 slots each: "middle" sends its
    # triangle now.
    "all_reduce": [
        ("all_gather", len(WIDTHS)),
        (
            "all_reduce",
            2 * 9 * WIDTHS["wide"] + 2 * 5 * WIDTHS["idle_on_one"] + triangle("middle") + triangle("narrow"),
        ),
    ],
}
EXPECTED_SENT["begun"] = EXPECTED_SENT["all_reduce"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_only_what_the_update_needs_is_sent(two_processes, transport):
    """Rows where they are fewer numbers, padded to the most rows of a process; else the upper triangle of z^T z;
    and the row counts. Not the d x d matrices of every layer."""
    expected = EXPECTED_SENT[transport]
    for rank in (0, 1):
        for step_sent in two_processes[rank][transport]["sent"]:
            assert step_sent == expected
    sent = sum(numel for _, numel in expected)
    full_matrices = sum(d * d + 1 for d in WIDTHS.values())  # what the step sent before: every X and every count
    assert sent < 0.5 * full_matrices, (sent, full_matrices)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_step_reads_the_device_once(two_processes, transport):
    """One read for every layer's loss and guard decision together; the counts are read from the CPU group."""
    for rank in (0, 1):
        for callers in two_processes[rank][transport]["reads"]:
            assert sorted(callers) == ["_gather_counts", "update_decorrelations"], callers


@pytest.mark.parametrize("transport", ["blocks", "blocks_gather"])
def test_block_diagonal_R_is_identical_on_both_processes_and_equal_to_each_block_updated_from_all_rows(
    two_processes, transport
):
    """Each block of a block-diagonal R takes the update of a full R of its width from its slice of every process's
    rows; only its slice of the rows (few rows) or its block of z^T z travels."""
    results = [two_processes[rank][transport] for rank in (0, 1)]
    for name, (width, block, _) in BLOCKS.items():
        assert torch.equal(results[0]["R"][name], results[1]["R"][name]), name
        R = [torch.eye(block, dtype=torch.float64) for _ in range(width // block)]
        for step in range(2):
            x = torch.cat([block_rows_of(name, rank, step) for rank in (0, 1)])
            R = [reference_update(r, x[:, i * block : (i + 1) * block]) for i, r in enumerate(R)]
        torch.testing.assert_close(results[0]["R"][name], torch.stack(R), rtol=1e-10, atol=1e-12)
    rows_numbers = 6 * BLOCKS["rows"][0] * (1 if transport == "blocks_gather" else 2)  # the most rows x d (x slots)
    triangles = (64 // 16) * 16 * 17 // 2
    expected = [("all_gather", 96 // 32 + 64 // 16)]  # the row counts, one per block
    if transport == "blocks_gather":
        expected += [("all_gather", rows_numbers), ("all_reduce", triangles)]
    else:
        expected += [("all_reduce", rows_numbers + triangles)]
    for rank in (0, 1):
        assert results[rank]["sent"] == [expected, expected]


@pytest.mark.parametrize("begun, plain", [("begun", "all_reduce"), ("begun32", "plain32")])
def test_a_begun_exchange_gives_the_same_R_bitwise(two_processes, begun, plain):
    """Begun inside a bf16 autocast (as in DBPTrainer's forward), the exchange still works in R's precision."""
    for name in WIDTHS:
        assert torch.equal(two_processes[0][begun]["R"][name], two_processes[0][plain]["R"][name]), name


@pytest.mark.parametrize("low, exact", [("bf16_32", "plain32"), ("bf16_gather32", "gather32")])
def test_statistics_sent_in_bfloat16_keep_R_identical_on_both_processes_in_half_the_bytes(two_processes, low, exact):
    for name in WIDTHS:
        assert torch.equal(two_processes[0][low]["R"][name], two_processes[1][low]["R"][name]), name
        # bfloat16 keeps 8 bits of mantissa: X's entries to about 0.4%, and R after two steps of lr 0.1 to 1e-2.
        torch.testing.assert_close(
            two_processes[0][low]["R"][name], two_processes[0][exact]["R"][name], rtol=0, atol=1e-2
        )
    assert any(not torch.equal(two_processes[0][low]["R"][n], two_processes[0][exact]["R"][n]) for n in WIDTHS)
    counts = 8 * len(WIDTHS)  # the row counts, int64, whatever the statistics travel in
    for rank in (0, 1):
        for low_bytes, exact_bytes in zip(
            two_processes[rank][low]["bytes"], two_processes[rank][exact]["bytes"], strict=True
        ):
            assert low_bytes - counts == (exact_bytes - counts) // 2


def test_updating_every_second_step_sends_nothing_in_between_and_updates_from_both_steps(two_processes):
    result = two_processes[0]["every2"]
    assert result["sent"][0] == [] and result["reads"][0] == []  # the first step: no exchange, no read
    assert result["steps"] == [2] * len(WIDTHS)  # yet every folded weight was reformed at both steps
    for name, width in WIDTHS.items():
        assert torch.equal(result["R"][name], two_processes[1]["every2"]["R"][name]), name
        x = torch.cat([rows_of(name, rank, step) for step in (0, 1) for rank in (0, 1)])
        R = reference_update(torch.eye(width, dtype=torch.float64), x) if x.shape[0] else torch.eye(width).double()
        torch.testing.assert_close(result["R"][name], R, rtol=1e-10, atol=1e-12)


def test_a_bad_transfer_dtype_is_refused_on_one_process_too():
    module = Decorrelation(4, sample_fraction=1.0)
    module.observe(torch.randn(3, 4))
    with pytest.raises(ValueError, match="transfer_dtype must be one of"):
        decorrelation_step([module], lr=0.1, kappa=0.1, transfer_dtype="int8")


def test_statistics_gathered_after_the_exchange_began_are_refused():
    module = Decorrelation(8, sample_fraction=1.0)
    module.observe(torch.randn(3, 8))
    pending = begin_decorrelation_step([module])
    module.observe(torch.randn(3, 8))  # a forward after the step's last one
    with pytest.raises(RuntimeError, match="after begin_decorrelation_step"):
        decorrelation_step([module], lr=0.1, kappa=0.1, pending=pending)


def test_one_process_reads_once_for_any_number_of_layers():
    torch.manual_seed(0)
    modules = [Decorrelation(width, sample_fraction=0.5) for width in (4, 16, 64, 8, 32)]
    for module in modules:
        module.observe(torch.randn(40, module.dim))
    modules[2].R.data.fill_(float("nan"))  # a diverged R: the guard refuses its update, on the device
    with Reads() as counter:
        loss = decorrelation_step(modules, lr=0.1, kappa=0.1)
    assert counter.callers == ["update_decorrelations"]
    assert [m.skipped_updates for m in modules] == [0, 0, 1, 0, 0] and loss is not None
    assert torch.isnan(modules[2].R).all() and all(torch.isfinite(m.R).all() for i, m in enumerate(modules) if i != 2)


def test_upper_triangle_round_trip():
    torch.manual_seed(0)
    a = torch.randn(7, 7)
    symmetric = a + a.T
    values = upper_triangle(symmetric)
    assert values.numel() == 7 * 8 // 2
    assert torch.equal(symmetric_from_upper_triangle(values, 7), symmetric)


def tiny_mae():
    from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining

    torch.manual_seed(0)
    return ViTMAEDBPForPreTraining(
        ViTMAEDBPConfig(
            **TINY,
        )
    )


def test_dbp_trainer_reads_the_device_once_per_optimizer_step(tmp_path, monkeypatch):
    from datasets import Dataset

    from hf_dbp import DBPTrainer, DBPTrainingArguments, DecorrelationHook

    model = tiny_mae()
    data = Dataset.from_dict({"pixel_values": torch.randn(16, 3, 16, 16).numpy()}).with_format("torch")
    args = DBPTrainingArguments(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=100,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        track_emissions=False,
    )
    trainer = DBPTrainer(model=model, args=args, train_dataset=data)
    update, reads = DecorrelationHook.step, []

    def counted(hook):
        with Reads() as counter:
            update(hook)
        reads.append(counter.callers)

    monkeypatch.setattr(DecorrelationHook, "step", counted)
    trainer.train()
    assert reads == [["update_decorrelations"]] * 3


def test_dbp_trainer_updates_R_every_k_steps_and_reforms_the_folds_at_every_step(tmp_path, monkeypatch):
    from datasets import Dataset

    from hf_dbp import DBPTrainer, DecorrelationHook
    from hf_dbp.core.model import decorrelation_modules
    from hf_dbp.training.training_args import DBPTrainingArguments

    model = tiny_mae()
    data = Dataset.from_dict({"pixel_values": torch.randn(24, 3, 16, 16).numpy()}).with_format("torch")
    args = DBPTrainingArguments(
        tmp_path,
        per_device_train_batch_size=4,
        max_steps=6,
        decorrelation_update_every=3,
        logging_steps=100,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        track_emissions=False,
    )
    trainer = DBPTrainer(model=model, args=args, train_dataset=data)
    modules = decorrelation_modules(model)
    history = []
    update = DecorrelationHook.step

    def recorded(hook):
        update(hook)
        history.append([m.R.clone() for m in modules])

    monkeypatch.setattr(DecorrelationHook, "step", recorded)
    trainer.train()
    previous = [[torch.eye(m.dim) for m in modules]] + history[:-1]
    moved = [not all(map(torch.equal, before, after)) for before, after in zip(previous, history, strict=True)]
    assert moved == [False, False, True, False, False, True]
    assert all(m.steps == 6 for m in modules)
    assert len(trainer.decorrelation_callback.hook.losses) == 2  # a loss per update, not per step


@pytest.mark.parametrize("flag, value", [("decorrelation_update_every", 0), ("decorrelation_transfer_dtype", "fp8")])
def test_bad_exchange_settings_are_refused_with_their_name(tmp_path, flag, value):
    from hf_dbp.training.training_args import DBPTrainingArguments

    with pytest.raises(ValueError, match=flag):
        DBPTrainingArguments(tmp_path, report_to="none", **{flag: value})


def test_rows_drawn_on_the_device_come_from_the_samplers_state_reproducibly():
    """On an accelerator the row indices are drawn there (no copy from the host in the forward); the sampler's CPU
    state still decides them, so checkpoints and resuming work as on the CPU. Run here on the CPU's device."""
    from hf_dbp.core.sampling import RowSampler, _sample_rows_on_device

    sampler = RowSampler(3)
    start = sampler.get_state()
    like = torch.zeros(1)
    first = _sample_rows_on_device(like, 50, 10, sampler.state)
    assert first.device == like.device and len(set(first.tolist())) == 10 and 0 <= first.min() and first.max() < 50
    assert not torch.equal(sampler.get_state(), start)  # the state advanced
    second = _sample_rows_on_device(like, 50, 10, sampler.state)
    sampler.set_state(start)
    assert torch.equal(_sample_rows_on_device(like, 50, 10, sampler.state), first)
    assert torch.equal(_sample_rows_on_device(like, 50, 10, sampler.state), second)


@pytest.mark.parametrize("variance_form", ["rows", "columns"])
def test_batched_updates_of_equal_shaped_R_equal_the_one_by_one_updates(variance_form):
    """Stacks of equal-shaped R (both forms of the statistics), one R refused by the guard inside a stack, a group
    split by the byte bound; the device still read once."""
    import hf_dbp.core.step as core

    torch.manual_seed(0)

    def make():
        torch.manual_seed(1)
        modules = [Decorrelation(d, sample_fraction=1.0) for d in (16, 16, 16, 12, 12, 12, 16, 8)]
        for i, m in enumerate(modules):
            m.R.data += 0.05 * torch.randn(m.dim, m.dim)
            m.observe(torch.randn(4 if 3 <= i <= 5 else 60, m.dim))  # rows for the 12s (2 x 4 < 12), else X
        modules[4].R.data[0, 0] = float("inf")  # refused, alone, inside its stack
        return modules

    one_by_one, batched = make(), make()
    loss = decorrelation_step(one_by_one, lr=0.1, kappa=0.2, variance_form=variance_form, batch_updates=False)
    original, rule, stacks = core._BATCH_BYTES, core.update_rule, []

    def recorded(R, *args, **kwargs):
        stacks.append(tuple(R.shape))
        return rule(R, *args, **kwargs)

    core._BATCH_BYTES = 2 * 16 * 16 * 4  # the four 16-wide R with X: two stacks of two
    core.update_rule = recorded
    try:
        with Reads() as counter:
            batched_loss = decorrelation_step(
                batched, lr=0.1, kappa=0.2, variance_form=variance_form, batch_updates=True
            )
    finally:
        core._BATCH_BYTES, core.update_rule = original, rule
    assert sorted(stacks) == [(2, 16, 16), (2, 16, 16), (3, 12, 12), (8, 8)]  # the 8-wide R alone, unstacked
    assert counter.callers == ["update_decorrelations"]
    assert batched_loss == pytest.approx(loss, rel=1e-6)
    assert [m.skipped_updates for m in batched] == [m.skipped_updates for m in one_by_one] == [0, 0, 0, 0, 1, 0, 0, 0]
    for a, b in zip(one_by_one, batched, strict=True):
        torch.testing.assert_close(b.R, a.R, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert not torch.equal(batched[0].R, make()[0].R)  # the stacked R were written back
