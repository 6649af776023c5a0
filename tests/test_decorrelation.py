"""The decorrelation core on its own: update rule, statistics, layer wrappers, folding, several processes."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hf_dbp.core.config import DecorrelationConfig
from hf_dbp.core.decorrelation import Decorrelation
from hf_dbp.core.inject import DecorrelationMonitor, fold_decorrelation, inject_decorrelation
from hf_dbp.core.layers import DecorrelatedConv2d, DecorrelatedLinear
from hf_dbp.core.model import (
    decorrelate,
    decorrelation_step,
    defer_weight_gradients,
    waiting_weight_gradients,
)
from hf_dbp.core.optimizer_hook import attach_decorrelation
from hf_dbp.core.sampling import RowSampler


def reference_update(R, rows, lr, kappa, variance_form="rows"):
    """The rule of docs/method.md, written out independently in float64 from the raw input rows; with "columns", the
    reference code's variance term R diag(v) (artcogsys/decorbp's `v * R`) in place of diag(v) R."""
    z = rows @ R.T
    X = z.T @ z / z.shape[0]
    C = X - torch.diag(torch.diagonal(X))
    v = (z * z - 1).mean(dim=0)
    loss = ((1 - kappa) * (C**2).sum() + kappa * (v**2).sum()) / R.shape[0] ** 2
    variance_term = torch.diag(v) @ R if variance_form == "rows" else R @ torch.diag(v)
    return R - lr * ((1 - kappa) * C @ R + kappa * variance_term), loss


class TwoBranches(nn.Module):
    """Three linears reading one input (like q, k, v) and one patchifying conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(6, 3)
        self.patch = nn.Conv2d(2, 7, kernel_size=2, stride=2)


def test_update_rule_matches_independent_computation_over_two_steps_with_accumulation():
    torch.manual_seed(0)
    model = TwoBranches().double()
    decorrelations = inject_decorrelation(model, {"abc": ["a", "b", "c"]}, sample_fraction=1.0)
    d = decorrelations["abc"].double()
    lr, kappa = 0.05, 0.3
    R = torch.eye(6, dtype=torch.float64)
    for _ in range(2):
        micro_batches = [torch.randn(3, 4, 6, dtype=torch.float64) * torch.linspace(0.5, 2, 6) for _ in range(2)]
        for x in micro_batches:  # two gradient-accumulation micro-batches, each read by a, b and c
            model.a(x), model.b(x), model.c(x)
        rows = torch.cat([x.reshape(-1, 6) for x in micro_batches])
        R, expected_loss = reference_update(R, rows, lr, kappa)
        loss = decorrelation_step([d], lr=lr, kappa=kappa)
        torch.testing.assert_close(d.R, R, rtol=1e-12, atol=1e-12)
        assert loss == pytest.approx(float(expected_loss), rel=1e-10)
    assert d.num_rows == 0 and d.sum_zz is None  # cleared after each step


@pytest.mark.parametrize("num_rows", [3, 50])  # 2 n < d: the update from the rows themselves; else from X
def test_both_variance_forms_match_an_independent_computation(num_rows):
    """diag(v) R (the default) and the reference code's R diag(v), each against the rule written out, from an R that
    commutes with no diagonal matrix but the identity's multiples; the two forms give different R there."""
    torch.manual_seed(1)
    dim = 8
    start = torch.eye(dim, dtype=torch.float64) + 0.2 * torch.randn(dim, dim, dtype=torch.float64)
    rows = torch.randn(num_rows, dim, dtype=torch.float64) * torch.linspace(0.5, 3, dim, dtype=torch.float64)
    results = {}
    for form in ("rows", "columns"):
        d = Decorrelation(dim, sample_fraction=1.0).double()
        d.R.copy_(start)
        d.observe(rows)
        assert (d.sum_zz is None) == (2 * num_rows < dim)
        loss = decorrelation_step([d], lr=0.01, kappa=0.7, variance_form=form)
        expected, expected_loss = reference_update(start, rows, lr=0.01, kappa=0.7, variance_form=form)
        torch.testing.assert_close(d.R, expected, rtol=1e-12, atol=1e-12)
        assert loss == pytest.approx(float(expected_loss), rel=1e-10)
        results[form] = d.R.detach().clone()
    assert not torch.allclose(results["rows"], results["columns"], rtol=0, atol=1e-6)


def test_the_two_variance_forms_agree_from_the_identity():
    """At R = I, R commutes with diag(v): the first step is the same in both forms."""
    rows = torch.randn(40, 5, dtype=torch.float64) * 2
    updated = []
    for form in ("rows", "columns"):
        d = Decorrelation(5, sample_fraction=1.0).double()
        d.observe(rows)
        decorrelation_step([d], lr=0.05, kappa=0.5, variance_form=form)
        updated.append(d.R.detach().clone())
    torch.testing.assert_close(updated[0], updated[1], rtol=1e-14, atol=1e-14)


def test_unknown_variance_form_is_refused():
    with pytest.raises(ValueError, match="variance_form"):
        decorrelation_step([Decorrelation(3)], lr=0.1, kappa=0.1, variance_form="both")


def test_fresh_layers_are_exactly_the_plain_layers():
    torch.manual_seed(0)
    plain = TwoBranches()
    model = TwoBranches()
    model.load_state_dict(plain.state_dict())
    inject_decorrelation(model, {"abc": ["a", "b", "c"], "patch": ["patch"]})
    assert isinstance(model.a, DecorrelatedLinear) and isinstance(model.patch, DecorrelatedConv2d)
    assert model.a.decorrelation is model.b.decorrelation is model.abc_decorrelation
    x, image = torch.randn(8, 6), torch.randn(2, 2, 6, 6)
    for name in "abc":
        assert torch.equal(getattr(model, name)(x), getattr(plain, name)(x))
        assert torch.equal(getattr(model, name)(x[:2]), getattr(plain, name)(x[:2]))  # explicit R x path too
    assert torch.equal(model.patch(image), plain.patch(image))
    # Parameter names are those of the plain model, plus one R per group.
    assert set(model.state_dict()) == set(plain.state_dict()) | {"abc_decorrelation.R", "patch_decorrelation.R"}


def test_both_forward_forms_give_the_same_outputs_and_gradients():
    """Explicit W (R x) and folded (W R) x: same outputs and gradients for W, b and x (float64)."""
    torch.manual_seed(0)
    model = TwoBranches().double()
    d = inject_decorrelation(model, {"a": ["a"]})["a"].double()
    d.R.copy_(torch.eye(6, dtype=torch.float64) + 0.1 * torch.randn(6, 6, dtype=torch.float64))
    layer = model.a  # 5 outputs: 2 rows take the explicit form, 12 rows the folded one
    results = []
    for rows in (2, 12):
        x = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
        layer.zero_grad()
        (layer(x) ** 2).sum().backward()
        expected_x = x.detach().clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True)
        ((expected_x @ d.R.T @ w.T + b) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, expected_x.grad)
        torch.testing.assert_close(layer.weight.grad, w.grad)
        torch.testing.assert_close(layer.bias.grad, b.grad)
        results.append(rows)
    assert results == [2, 12]


def test_patch_conv_statistics_are_image_patches():
    torch.manual_seed(0)
    model = TwoBranches()
    d = inject_decorrelation(model, {"patch": ["patch"]}, sample_fraction=1.0)["patch"]
    image = torch.randn(3, 2, 4, 6)
    model.patch(image)
    # 3 images x (2 x 3) patches of 2 channels x 2 x 2 pixels, flattened like the conv's weight (c, i, j)
    patches = image.reshape(3, 2, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, 8)
    assert d.num_rows == 18
    torch.testing.assert_close(d.second_moment_sum(), patches.T @ patches)


def test_folding_gives_the_same_outputs():
    torch.manual_seed(0)
    model = TwoBranches()
    plain = TwoBranches()
    groups = inject_decorrelation(model, {"abc": ["a", "b", "c"], "patch": ["patch"]})
    for d in groups.values():
        d.R.add_(0.1 * torch.randn_like(d.R))
    plain.load_state_dict(fold_decorrelation(model), strict=True)
    x, image = torch.randn(4, 6), torch.randn(2, 2, 6, 6)
    for name in "abc":
        torch.testing.assert_close(getattr(plain, name)(x), getattr(model, name)(x))
    torch.testing.assert_close(plain.patch(image), model.patch(image))


@pytest.mark.parametrize("fraction, expected", [(1.0, 40), (0.5, 20), (0.01, 1)])
def test_sample_fraction(fraction, expected):
    d = Decorrelation(3, sample_fraction=fraction, generator=torch.Generator().manual_seed(0))
    rows = torch.randn(40, 3)
    d.observe(rows)
    assert d.num_rows == expected
    if fraction == 1.0:  # every row exactly once
        torch.testing.assert_close(d.second_moment_sum(), rows.T @ rows)


def test_subsample_is_without_replacement_and_leaves_global_rng_alone():
    d = Decorrelation(1, sample_fraction=0.5, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    rows = torch.arange(1, 101, dtype=torch.float32)[:, None]  # distinct values: sum of squares reveals repeats
    for _ in range(20):
        d.reset_statistics()
        d.observe(rows)
        z = d.second_moment_sum().item()
        # 50 distinct values drawn from 1..100: the sum of squares lies between that of 1..50 and that of 51..100.
        assert sum(i * i for i in range(1, 51)) <= z <= sum(i * i for i in range(51, 101))
    assert torch.equal(state, torch.random.get_rng_state())


def test_sample_fraction_is_validated():
    with pytest.raises(ValueError, match="sample_fraction"):
        Decorrelation(3, sample_fraction=0.0)


def test_eval_mode_and_recomputed_forwards_are_not_counted():
    torch.manual_seed(0)
    model = TwoBranches()
    d = inject_decorrelation(model, {"a": ["a"]}, sample_fraction=1.0)["a"]
    x = torch.randn(5, 6, requires_grad=True)
    model.eval()
    model.a(x)
    assert d.num_rows == 0
    model.train()
    for reentrant in (True, False):
        d.reset_statistics()
        y = torch.utils.checkpoint.checkpoint(model.a, x, use_reentrant=reentrant)
        y.sum().backward()  # re-runs the forward inside backward
        assert d.num_rows == 5


def test_monitor_measures_without_changing_the_model():
    torch.manual_seed(0)
    model = TwoBranches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = DecorrelationMonitor(model, {"abc": ["a", "b", "c"], "patch": ["patch"]}, sample_fraction=1.0)
    x = torch.randn(30, 6) * torch.arange(1, 7)
    model.a(x), model.b(x), model.c(x)
    loss = decorrelation_step(monitor.decorrelations.values(), lr=0.0, kappa=0.1)
    _, expected = reference_update(torch.eye(6, dtype=torch.float64), x.double(), lr=0.0, kappa=0.1)
    assert loss == pytest.approx(float(expected), rel=1e-5)  # only "abc" saw rows
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monitor.remove()
    model.a(x)
    assert monitor.decorrelations["abc"].num_rows == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        model = TwoBranches().double()
        groups = inject_decorrelation(model, {"abc": ["a", "b", "c"], "patch": ["patch"]}, sample_fraction=1.0)
        for step in range(2):
            generator = torch.Generator().manual_seed(100 * step + rank)  # different data on each rank
            model.a(torch.randn(7 + rank, 6, generator=generator, dtype=torch.float64))
            model.patch(torch.randn(2, 2, 4, 4, generator=generator, dtype=torch.float64))
            decorrelation_step([g.double() for g in groups.values()], lr=0.1, kappa=0.2)
        results[rank] = {name: g.R.clone() for name, g in groups.items()}
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_end_with_identical_R_from_the_rows_of_both():
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for name in ("abc", "patch"):
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=0)
    # Independent computation over the rows of both ranks together.
    R = torch.eye(6, dtype=torch.float64)
    for step in range(2):
        rows = torch.cat(
            [
                torch.randn(7 + r, 6, generator=torch.Generator().manual_seed(100 * step + r), dtype=torch.float64)
                for r in (0, 1)
            ]
        )
        R, _ = reference_update(R, rows, lr=0.1, kappa=0.2)
    torch.testing.assert_close(results[0]["abc"], R)


def test_update_from_the_sampled_rows_matches_the_rule():
    """With fewer rows than half the width, X @ R is formed as z^T (z R) / n: the same update, cheaper."""
    torch.manual_seed(0)
    d = Decorrelation(16, sample_fraction=1.0).double()
    d.R.copy_(torch.eye(16, dtype=torch.float64) + 0.05 * torch.randn(16, 16, dtype=torch.float64))
    rows = torch.randn(5, 16, dtype=torch.float64) * 2  # 2 * 5 < 16: the rows form
    expected, expected_loss = reference_update(d.R.clone(), rows, lr=0.02, kappa=0.4)
    d.observe(rows[:2])
    d.observe(rows[2:])  # two micro-batches
    assert sum(r.shape[0] for r in d.sampled_rows) == 5
    loss = decorrelation_step([d], lr=0.02, kappa=0.4)
    torch.testing.assert_close(d.R, expected, rtol=1e-12, atol=1e-12)
    assert loss == pytest.approx(float(expected_loss), rel=1e-10)
    assert d.sampled_rows == []


def test_q_k_v_share_one_explicit_R_x(monkeypatch):
    torch.manual_seed(0)
    plain = TwoBranches()
    model = TwoBranches()
    model.load_state_dict(plain.state_dict())
    d = inject_decorrelation(model, {"abc": ["a", "b", "c"]})["abc"]
    assert d.consumers == 3 and d.group_out_features == 5 + 4 + 3
    with torch.no_grad():
        d.R.add_(0.1 * torch.randn_like(d.R))
    calls = []
    original = Decorrelation.forward
    monkeypatch.setattr(Decorrelation, "forward", lambda self, x: calls.append(1) or original(self, x))
    x = torch.randn(4, 6)  # 4 rows < 12 outputs of the group: the explicit form
    outputs = [model.a(x), model.b(x), model.c(x)]
    assert len(calls) == 1 and d._shared is None  # computed once, released after the last consumer
    for out, layer in zip(outputs, (plain.a, plain.b, plain.c), strict=True):
        torch.testing.assert_close(out, layer(x @ d.R.T))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("rows", [2, 40])  # explicit (shared z) and folded forms
def test_decorrelated_layers_trace_without_graph_breaks(rows, grad, training):
    """In training the forward also samples rows for the statistics, from the model's own generator."""
    import torch._dynamo as dynamo

    model = TwoBranches().train(training)
    inject_decorrelation(
        model, {"abc": ["a", "b", "c"], "patch": ["patch"]}, sample_fraction=0.5, generator=RowSampler(0)
    )

    def forward(x, image):
        with torch.set_grad_enabled(grad):
            return model.a(x).sum() + model.b(x).sum() + model.c(x).sum() + model.patch(image).sum()

    dynamo.reset()
    explanation = dynamo.explain(forward)(torch.randn(rows, 6), torch.randn(2, 2, 4, 4))
    dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # Training forwards recorded their rows (once per group), in the graph rather than around it.
    assert model.abc_decorrelation.num_rows == (rows // 2 if training else 0)
    assert model.patch_decorrelation.num_rows == (4 if training else 0)


def test_compiled_training_step_matches_eager():
    """torch.compile (AOT autograd, functionalised) samples the same rows, and gives the same R, as eager code."""
    torch.manual_seed(0)
    reference = TwoBranches().double()
    x = torch.randn(3, 30, 6, dtype=torch.float64)
    results = []
    for compiled in (False, True):
        model = TwoBranches().double()
        model.load_state_dict(reference.state_dict())
        groups = inject_decorrelation(
            model, {"abc": ["a", "b", "c"], "patch": ["patch"]}, sample_fraction=0.3, generator=RowSampler(7)
        )
        for d in groups.values():
            d.R.data = d.R.data.double()

        def loss_fn(x, image, model=model):
            return (model.a(x) ** 2).sum() + model.b(x).sum() + model.c(x).sum() + (model.patch(image) ** 2).sum()

        if compiled:
            torch._dynamo.reset()
            loss_fn = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
        states = []
        for step in range(3):
            model.zero_grad()
            image = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            loss_fn(x * (step + 1), image).backward()
            states.append(
                (
                    model.abc_decorrelation.num_rows,
                    model.abc_decorrelation.second_moment_sum().clone(),
                    model.a.weight.grad.clone(),
                )
            )
            decorrelation_step(groups.values(), lr=0.1, kappa=0.5)
        results.append((states, [d.R.clone() for d in groups.values()]))
    torch._dynamo.reset()
    (eager_states, eager_r), (compiled_states, compiled_r) = results
    for (n, zz, grad), (n_c, zz_c, grad_c) in zip(eager_states, compiled_states, strict=True):
        assert n == n_c == 27  # 30% of 90 rows
        torch.testing.assert_close(zz_c, zz)  # the same rows were drawn
        torch.testing.assert_close(grad_c, grad)
    for r, r_c in zip(eager_r, compiled_r, strict=True):
        assert not torch.equal(r, torch.eye(r.shape[0], dtype=r.dtype))
        torch.testing.assert_close(r_c, r)


def test_row_sampler_draws_what_a_torch_generator_draws_and_restores_its_state():
    sampler, generator = RowSampler(3), torch.Generator().manual_seed(3)
    for n in (10, 100, 7):
        assert torch.equal(sampler.sample(n, 4), torch.randperm(n, generator=generator)[:4])
    state = sampler.get_state()
    first = sampler.sample(50, 5)
    sampler.set_state(state)
    assert torch.equal(sampler.sample(50, 5), first)
    # One sampler shared by every layer, as one generator was: different rows for each layer.
    model = TwoBranches()
    groups = inject_decorrelation(model, {"a": ["a"], "b": ["b"]}, sample_fraction=0.5, generator=torch.Generator())
    assert groups["a"].generator is groups["b"].generator
    with pytest.raises(TypeError, match="RowSampler, a torch.Generator or None"):
        Decorrelation(3, generator=0)


def test_folded_weight_is_reused_in_evaluation_until_W_or_R_changes():
    model = TwoBranches().eval()
    inject_decorrelation(model, {"abc": ["a", "b", "c"]})
    x = torch.randn(20, 6)  # 20 rows > 12 outputs: the folded form
    with torch.no_grad():
        model.a(x)
        first = model.a._folded_cache[1]
        model.a(x)
        assert model.a._folded_cache[1] is first  # reused
        model.abc_decorrelation.R.mul_(1.5)  # DBP step
        torch.testing.assert_close(model.a(x), F.linear(x @ model.abc_decorrelation.R.T, model.a.weight, model.a.bias))
        assert model.a._folded_cache[1] is not first
        second = model.a._folded_cache[1]
        model.a.weight.add_(1.0)  # optimizer step
        model.a(x)
        assert model.a._folded_cache[1] is not second


@pytest.mark.parametrize("reuse", [False, True])  # autograd through W R, or the cached fold's own backward
def test_patch_conv_gives_the_outputs_and_gradients_of_the_folded_conv(reuse):
    """The conv's folded forward against autograd through an independent W R (float64)."""
    torch.manual_seed(0)
    model = TwoBranches().double()
    d = inject_decorrelation(model, {"patch": ["patch"]})["patch"].double()
    d.reuse_fold_in_training = reuse
    d.R.copy_(torch.eye(8, dtype=torch.float64) + 0.1 * torch.randn(8, 8, dtype=torch.float64))
    image = torch.randn(3, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    (model.patch(image) ** 2).sum().backward()
    expected_image = image.detach().clone().requires_grad_(True)
    w = model.patch.weight.detach().clone().requires_grad_(True)
    b = model.patch.bias.detach().clone().requires_grad_(True)
    folded = (w.reshape(7, -1) @ d.R).reshape(w.shape)
    (F.conv2d(expected_image, folded, b, stride=2) ** 2).sum().backward()
    torch.testing.assert_close(image.grad, expected_image.grad)
    torch.testing.assert_close(model.patch.weight.grad, w.grad)
    torch.testing.assert_close(model.patch.bias.grad, b.grad)


@pytest.mark.parametrize("deferred", [False, True])  # dW = dF R^T per micro-batch, or once per step
def test_folded_weight_is_formed_once_per_optimizer_step_across_micro_batches(monkeypatch, deferred):
    """Gradient accumulation: one W R for all micro-batches, gradients equal to autograd's, refolded after a step;
    with `defer_weight_gradients`, W's gradient is unset until the step's last micro-batch, then the same."""
    torch.manual_seed(0)
    model = TwoBranches().double()
    groups = inject_decorrelation(model, {"abc": ["a", "b", "c"], "patch": ["patch"]})
    for d in groups.values():
        d.double()
        d.R.copy_(torch.eye(d.dim, dtype=torch.float64) + 0.1 * torch.randn(d.dim, d.dim, dtype=torch.float64))
        d.reuse_fold_in_training = True  # as DBPTrainer sets it under gradient accumulation
    micro_batch = [0]
    defer_weight_gradients(model, (lambda: micro_batch[0] == 2) if deferred else None)
    folds = []
    for cls in (DecorrelatedLinear, DecorrelatedConv2d):
        original = cls.fold
        monkeypatch.setattr(cls, "fold", lambda self, original=original: folds.append(self) or original(self))
    plain = TwoBranches().double()

    def fold_by_hand():  # without the layers' cache, so that `folds` counts the forwards' folds only
        with torch.no_grad():
            for name in ("a", "b", "c", "patch"):
                w, R = getattr(model, name).weight, groups["patch" if name == "patch" else "abc"].R
                getattr(plain, name).weight.copy_((w.reshape(w.shape[0], -1) @ R).reshape(w.shape))
                getattr(plain, name).bias.copy_(getattr(model, name).bias)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # optimizer steps
        fold_by_hand()
        folds.clear()
        plain.zero_grad()
        optimizer.zero_grad()
        for micro_batch[0] in range(3):  # micro-batches of 20 rows > 12 outputs: the folded form
            x, image = torch.randn(20, 6, dtype=torch.float64), torch.randn(2, 2, 4, 4, dtype=torch.float64)
            for net in (model, plain):
                (net.a(x).pow(2).sum() + net.b(x).sum() + net.c(x).sum() + net.patch(image).pow(2).sum()).backward()
            waiting = deferred and micro_batch[0] < 2
            assert all((getattr(model, name).weight.grad is None) == waiting for name in ("a", "b", "c", "patch"))
            assert all(getattr(model, name).bias.grad is not None for name in ("a", "b", "c", "patch"))
            assert sorted(waiting_weight_gradients(model)) == (["a", "b", "c", "patch"] if waiting else [])
        assert sorted(id(layer) for layer in folds) == sorted(map(id, (model.a, model.b, model.c, model.patch)))
        for name in ("a", "b", "c", "patch"):
            # The folded layer's weight gradient is W R's gradient times R^T.
            R = groups["patch" if name == "patch" else "abc"].R
            expected = getattr(plain, name).weight.grad
            expected = (expected.reshape(expected.shape[0], -1) @ R.T).reshape(expected.shape)
            torch.testing.assert_close(getattr(model, name).weight.grad, expected)
            torch.testing.assert_close(getattr(model, name).bias.grad, getattr(plain, name).bias.grad)
        optimizer.step()
        decorrelation_step(groups.values(), lr=0.01, kappa=0.5)


def test_an_optimizer_step_before_the_waiting_weight_gradients_arrive_is_refused():
    """A loop whose signal never says "last micro-batch" would step without part of W's gradient: the hook refuses."""
    torch.manual_seed(0)
    model = decorrelate(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), DecorrelationConfig(target_modules=["0"])
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_decorrelation(optimizer, model, gradient_accumulation_steps=2)  # one fold serves the micro-batches
    defer_weight_gradients(model, lambda: False)
    model(torch.randn(20, 6)).sum().backward()  # 20 rows > 8 outputs: the folded form
    assert model[0].weight.grad is None
    with pytest.raises(RuntimeError, match=r"1 decorrelated layer\(s\) \(0\) still held fold gradients"):
        optimizer.step()


@pytest.mark.parametrize("reuse", [False, True])
def test_folded_forward_under_bfloat16_autocast_keeps_weights_and_gradients_in_float32(reuse):
    torch.manual_seed(0)
    model = TwoBranches()
    groups = inject_decorrelation(model, {"abc": ["a", "b", "c"], "patch": ["patch"]})
    for d in groups.values():
        d.reuse_fold_in_training = reuse
    x, image = torch.randn(20, 6), torch.randn(2, 2, 4, 4)
    gradients = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = model.a(x)
            loss = out.float().pow(2).sum() + model.patch(image).float().pow(2).sum()
        assert out.dtype == (torch.bfloat16 if enabled else torch.float32)
        loss.backward()
        gradients.append([model.a.weight.grad.clone(), model.patch.weight.grad.clone()])
        assert all(g.dtype == torch.float32 for g in gradients[-1])
    for full, half in zip(*gradients, strict=True):
        torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    assert groups["abc"].R.dtype == torch.float32
    if reuse:
        assert model.a._folded_cache[1].dtype == torch.float32


def test_every_decorrelation_step_refolds_also_when_W_was_written_behind_its_version_counter():
    """Sharded optimizers (FSDP) write W's storage without bumping its version; the step after them still refolds,
    also with a decorrelation lr of 0, where R does not move."""
    model = TwoBranches()
    groups = inject_decorrelation(model, {"abc": ["a", "b", "c"]})
    groups["abc"].reuse_fold_in_training = True
    x = torch.randn(20, 6)  # the folded form
    model.a(x).sum().backward()
    model.a.weight.data.add_(1.0)  # not seen by the version counter
    decorrelation_step(groups.values(), lr=0.0, kappa=0.5)
    torch.testing.assert_close(model.a(x), F.linear(x @ groups["abc"].R.T, model.a.weight, model.a.bias))


def test_training_after_evaluation_under_inference_mode():
    model = TwoBranches()
    inject_decorrelation(model, {"abc": ["a", "b", "c"]})["abc"].reuse_fold_in_training = True
    x = torch.randn(20, 6)
    with torch.inference_mode():
        expected = model.a(x)
    out = model.a(x)
    out.sum().backward()  # an inference tensor cached for the fold could not be saved for this backward
    torch.testing.assert_close(out.detach(), expected)
    assert model.a.weight.grad is not None


@pytest.mark.parametrize("reuse", [False, True])
def test_second_derivatives_through_the_folded_form_are_right_or_refused(reuse):
    """Autograd through W R gives second derivatives; the cached fold's backward refuses rather than drop W's."""
    torch.manual_seed(0)
    model = TwoBranches().double()
    d = inject_decorrelation(model, {"abc": ["a", "b", "c"]})["abc"].double()
    d.R.add_(0.1 * torch.randn_like(d.R))
    d.reuse_fold_in_training = reuse
    x = torch.randn(20, 6, requires_grad=True, dtype=torch.float64)
    (grad_x,) = torch.autograd.grad(model.a(x).pow(2).sum(), x, create_graph=True)
    if reuse:
        with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
            grad_x.sum().backward()
        return
    grad_x.pow(2).sum().backward()
    w = model.a.weight.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.linear(x, w @ d.R, model.a.bias).pow(2).sum(), x, create_graph=True)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(model.a.weight.grad, w.grad)


def test_modules_built_from_one_torch_generator_share_its_sequence():
    generator = torch.Generator().manual_seed(0)
    first, second = Decorrelation(1, 0.5, generator), Decorrelation(1, 0.5, generator)
    assert first.generator is second.generator
    rows = torch.arange(1.0, 101.0)[:, None]
    first.observe(rows)
    second.observe(rows)
    assert not torch.equal(
        first.second_moment_sum(), second.second_moment_sum()
    )  # different rows, not one stream copied twice


def test_an_unknown_layer_kind_is_refused_with_its_name_and_the_choices():
    from hf_dbp import ViTMAEDBPConfig

    with pytest.raises(ValueError, match=r"unknown kinds \['fc3'\].*patch_embeddings"):
        ViTMAEDBPConfig(decorrelation_layers=["qkv", "fc3"])


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("rows", [3, 40])  # the update from the rows, and from z^T z
def test_a_decorrelation_step_taken_inside_autocast_updates_R_in_its_own_precision(rows, block_size):
    """A loop that runs its whole step under bf16 autocast (benchmarks/gpu_check.py does) gets the float32 update."""
    torch.manual_seed(0)
    x = torch.randn(rows, 16) @ torch.randn(16, 16)
    modules = [Decorrelation(16, sample_fraction=1.0, block_size=block_size) for _ in range(2)]
    for module in modules:
        module.observe(x)
    decorrelation_step(modules[:1], lr=0.1, kappa=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decorrelation_step(modules[1:], lr=0.1, kappa=0.2)
    assert modules[1].R.dtype == torch.float32
    torch.testing.assert_close(modules[1].R, modules[0].R, rtol=1e-6, atol=1e-7)
    assert not modules[0].is_identity()
