"""ViTMAEDBP models: config validation, equality with plain ViTMAE, checkpoints, the DBP step, merging."""

import importlib
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import offline_env, randomise_R
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    BertConfig,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)

import hf_dbp
from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining, ViTMAEDBPModel
from hf_dbp.models.vit_mae_dbp.remote_code import remote_code_auto_class


def inputs(batch=2, size=16, patches=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator), torch.rand(batch, patches, generator=generator)


@pytest.fixture
def plain_checkpoints(tmp_path, tiny_kwargs):
    """A plain ViTMAE checkpoint in the 4.x key layout (what save_pretrained writes) and in the 5.x module layout."""
    torch.manual_seed(0)
    plain = ViTMAEForPreTraining(ViTMAEConfig(**tiny_kwargs)).eval()
    legacy, modern = tmp_path / "legacy", tmp_path / "modern"
    plain.save_pretrained(legacy)
    legacy_keys = load_file(legacy / "model.safetensors")
    assert any(k.startswith("vit.encoder.layer.0.attention.attention.query") for k in legacy_keys)
    modern.mkdir()
    save_file(plain.state_dict(), modern / "model.safetensors", metadata={"format": "pt"})
    (modern / "config.json").write_text((legacy / "config.json").read_text())
    assert "vit.layers.0.attention.q_proj.weight" in load_file(modern / "model.safetensors")
    return plain, {"4.x": legacy, "5.x": modern}


# --- configuration -------------------------------------------------------------------------------------------------


def test_config_defaults_and_registration():
    config = ViTMAEDBPConfig()
    assert config.model_type == "vit_mae_dbp"
    assert config.decorrelation_layers == ["patch_embeddings", "qkv", "o_proj", "fc1", "fc2"]
    assert isinstance(AutoConfig.for_model("vit_mae_dbp"), ViTMAEDBPConfig)


@pytest.mark.parametrize(
    "field, value",
    [
        ("decorrelation_lr", -1e-3),
        ("decorrelation_lr", "fast"),
        ("decorrelation_kappa", 1.5),
        ("decorrelation_kappa", -0.1),
        ("decorrelation_sample_fraction", 0.0),
        ("decorrelation_sample_fraction", 1.2),
        ("decorrelation_layers", ["qkv", "decoder"]),
        ("decorrelation_layers", ["fc1", "fc1"]),
    ],
)
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ViTMAEDBPConfig(**{field: value})


def test_config_of_another_model_type_is_refused(tmp_path):
    BertConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert'"):
        ViTMAEDBPConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert'"):
        ViTMAEDBPForPreTraining.from_pretrained(tmp_path)


# --- equality with the plain model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_plain_checkpoint_loads_with_identity_R_and_equal_outputs(plain_checkpoints, layout):
    plain, paths = plain_checkpoints
    model = ViTMAEDBPForPreTraining.from_pretrained(paths[layout], decorrelation_lr=5e-4).eval()
    assert model.config.model_type == "vit_mae_dbp" and model.config.decorrelation_lr == 5e-4
    modules = model.decorrelation_modules()
    assert len(modules) == 1 + 4 * 2  # patch embedding + (qkv, o_proj, fc1, fc2) per layer
    for d in modules:
        assert d.R.dtype == torch.float32
        assert torch.equal(d.R, torch.eye(d.dim))
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    pixels, noise = inputs()
    expected, got = (
        plain(pixels, noise=noise, output_hidden_states=True),
        model(pixels, noise=noise, output_hidden_states=True),
    )
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.loss, expected.loss)
    assert torch.equal(got.mask, expected.mask) and torch.equal(got.ids_restore, expected.ids_restore)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert torch.equal(a, b)


def test_encoder_alone_loads_from_plain_checkpoint(plain_checkpoints):
    plain, paths = plain_checkpoints
    encoder = ViTMAEDBPModel.from_pretrained(paths["4.x"]).eval()
    pixels, noise = inputs()
    assert torch.equal(
        encoder(pixels, noise=noise).last_hidden_state, plain.vit(pixels, noise=noise).last_hidden_state
    )


def test_interpolated_position_encoding_is_passed_through(plain_checkpoints):
    plain, paths = plain_checkpoints
    model = ViTMAEDBPForPreTraining.from_pretrained(paths["5.x"]).eval()
    pixels, noise = inputs(size=24, patches=36)
    expected = plain(pixels, noise=noise, interpolate_pos_encoding=True)
    assert torch.equal(model(pixels, noise=noise, interpolate_pos_encoding=True).logits, expected.logits)


def test_only_the_configured_encoder_layers_are_decorrelated(tiny_kwargs):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs, decorrelation_layers=["qkv", "fc2"]))
    names = sorted(n for n, _ in model.named_parameters() if n.endswith("_decorrelation.R"))
    assert names == [f"vit.layers.{i}.{m}_decorrelation.R" for i in range(2) for m in ("attention.qkv", "mlp.fc2")]
    attention = model.vit.layers[0].attention
    assert attention.q_proj.decorrelation is attention.k_proj.decorrelation is attention.v_proj.decorrelation
    assert not any("decorrelation" in n for n, _ in model.decoder.named_parameters())
    assert all(not d.R.requires_grad for d in model.decorrelation_modules())


# --- checkpoints -----------------------------------------------------------------------------------------------------


def test_save_and_load_round_trips_R_exactly(tmp_path, tiny_kwargs):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs, decorrelation_kappa=0.2)).eval()
    randomise_R(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit_mae_dbp"
    for loader in (ViTMAEDBPForPreTraining, AutoModelForPreTraining):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is ViTMAEDBPForPreTraining
        assert loaded.config.decorrelation_kappa == 0.2
        state, original = loaded.state_dict(), model.state_dict()
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) for k in state)
        pixels, noise = inputs()
        assert torch.equal(loaded(pixels, noise=noise).logits, model(pixels, noise=noise).logits)
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder) is ViTMAEDBPModel
    assert torch.equal(
        encoder.vit.layers[0].mlp.fc1_decorrelation.R
        if hasattr(encoder, "vit")
        else encoder.layers[0].mlp.fc1_decorrelation.R,
        model.vit.layers[0].mlp.fc1_decorrelation.R,
    )


def test_half_precision_load_keeps_R_in_float32(tmp_path, tiny_kwargs):
    ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs)).save_pretrained(tmp_path)
    model = ViTMAEDBPForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16).train()
    assert model.vit.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    assert all(d.R.dtype == torch.float32 for d in model.decorrelation_modules())
    model(inputs()[0].bfloat16()).loss.backward()
    assert model.decorrelation_step() > 0


def layer_combinations():
    kinds = hf_dbp.DECORRELATION_LAYER_KINDS
    return [list(c) for n in range(len(kinds) + 1) for c in itertools.combinations(kinds, n)]


@pytest.mark.parametrize("layers", layer_combinations(), ids=lambda layers: "+".join(layers) or "none")
def test_keep_in_fp32_names_follow_transformers_convention_for_every_layer_choice(layers, tiny_kwargs):
    """transformers matches `_keep_in_fp32_modules_strict` entries as whole dotted name parts (its own
    test_keep_in_fp32_modules_exist and the loader's dtype plan): each entry must name at least one R, and together
    they must cover every R and nothing else."""
    config = ViTMAEDBPConfig(**tiny_kwargs, decorrelation_layers=layers)
    for model_class in (ViTMAEDBPModel, ViTMAEDBPForPreTraining):
        model = model_class(config)
        names = model._keep_in_fp32_modules_strict
        state = list(model.state_dict())
        matched = {entry: {k for k in state if re.search(rf"(?:^|\.){entry}(?:\.|$)", k)} for entry in names}
        assert all(matched.values()), (matched, model_class)
        assert set().union(*matched.values()) == {k for k in state if k.endswith("_decorrelation.R")}
        assert len(names) == len(layers)


def test_half_precision_loads_cast_everything_but_R(tmp_path, tiny_kwargs):
    """transformers' test_keep_in_fp32_modules, as it would run it: float16 and bfloat16 loads keep exactly R in
    float32."""
    ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs, decorrelation_layers=["qkv", "fc2"])).save_pretrained(
        tmp_path
    )
    for dtype in (torch.float16, torch.bfloat16):
        model = ViTMAEDBPForPreTraining.from_pretrained(tmp_path, dtype=dtype)
        for name, value in model.state_dict().items():
            expected = torch.float32 if name.endswith("_decorrelation.R") else dtype
            assert value.dtype == expected, (name, value.dtype)


def test_transformers_knows_the_base_model_and_the_head_model():
    """The static name lists transformers branches on (its model tests skip training base models; pipelines check
    model types) hold the DBP classes where they hold ViTMAE's."""
    from transformers.models.auto import modeling_auto

    for names, ours, theirs in (
        (modeling_auto.MODEL_MAPPING_NAMES, ViTMAEDBPModel, ViTMAEModel),
        (modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES, ViTMAEDBPForPreTraining, ViTMAEForPreTraining),
        (modeling_auto.MODEL_FOR_IMAGE_MAPPING_NAMES, ViTMAEDBPModel, ViTMAEModel),
    ):
        assert names["vit_mae"] == theirs.__name__
        assert names["vit_mae_dbp"] == ours.__name__
    assert ViTMAEDBPModel.__name__ in modeling_auto.MODEL_MAPPING_NAMES.values()
    assert ViTMAEDBPForPreTraining.__name__ not in modeling_auto.MODEL_MAPPING_NAMES.values()
    # The lazy Auto mappings that library code uses know them through the registrations.
    assert modeling_auto.MODEL_MAPPING[ViTMAEDBPConfig] is ViTMAEDBPModel
    assert modeling_auto.MODEL_FOR_PRETRAINING_MAPPING[ViTMAEDBPConfig] is ViTMAEDBPForPreTraining


USER_PACKAGE = {
    "__init__.py": "from .modeling import MyDBPForPreTraining, MyDBPConfig\n",
    "constants.py": "EXTRA = 'mine'\n",
    "modeling.py": (
        "from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining\n"
        "from .constants import EXTRA\n\n\n"
        "class MyDBPConfig(ViTMAEDBPConfig):\n"
        "    pass\n\n\n"
        "class MyDBPForPreTraining(ViTMAEDBPForPreTraining):\n"
        "    extra = EXTRA\n"
    ),
}


def test_a_users_subclass_saves_and_loads_like_a_subclass_of_any_transformers_model(
    tmp_path, tiny_kwargs, monkeypatch
):
    """A subclass in a user's package with relative imports: save_pretrained used to copy its file as remote code
    (and fail on the relative import). It saves weights and config, with the subclass as architecture, and loads
    back exactly."""
    package = tmp_path / "user_package"
    package.mkdir()
    for name, text in USER_PACKAGE.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    user = importlib.import_module("user_package")
    assert (
        remote_code_auto_class(user.MyDBPForPreTraining) is None and remote_code_auto_class(user.MyDBPConfig) is None
    )
    assert remote_code_auto_class(ViTMAEDBPForPreTraining) == "AutoModelForPreTraining"  # ours still carry their code
    model = user.MyDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    randomise_R(model)
    model.save_pretrained(tmp_path / "out")
    assert not list((tmp_path / "out").glob("modeling*.py")) and not (tmp_path / "out" / "constants.py").exists()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MyDBPForPreTraining"] and "AutoModelForPreTraining" not in config.get(
        "auto_map", {}
    )
    loaded = user.MyDBPForPreTraining.from_pretrained(tmp_path / "out")
    assert type(loaded) is user.MyDBPForPreTraining and loaded.extra == "mine"
    state, original = loaded.state_dict(), model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    user.MyDBPConfig(**tiny_kwargs).save_pretrained(tmp_path / "config_only")
    assert not list((tmp_path / "config_only").glob("*.py"))


def test_the_variance_form_of_the_config_reaches_the_step(tiny_kwargs):
    """`decorrelation_variance_form` of the config decides the update; "columns" is the reference code's R diag(v)."""
    results = {}
    for form in ("rows", "columns"):
        torch.manual_seed(0)
        model = ViTMAEDBPForPreTraining(
            ViTMAEDBPConfig(
                **tiny_kwargs, decorrelation_lr=0.05, decorrelation_kappa=0.5, decorrelation_variance_form=form
            )
        ).train()
        randomise_R(model, scale=0.2)
        for _ in range(2):
            model(inputs()[0]).loss.backward()
            model.decorrelation_step()
        results[form] = model.vit.layers[0].mlp.fc1_decorrelation.R.detach().clone()
    assert not torch.allclose(results["rows"], results["columns"], atol=1e-7)
    with pytest.raises(ValueError, match="decorrelation_variance_form"):
        ViTMAEDBPConfig(decorrelation_variance_form="diagonal")


# --- the DBP step ----------------------------------------------------------------------------------------------------


def test_decorrelation_step_follows_the_rule_from_the_layer_inputs(tiny_kwargs):
    """Two steps, kappa > 0, two micro-batches per step, checked against an independent float64 computation."""
    lr, kappa = 0.01, 0.25
    config = ViTMAEDBPConfig(
        **tiny_kwargs, decorrelation_lr=lr, decorrelation_kappa=kappa, decorrelation_sample_fraction=1.0
    )
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(config).train()
    targets = {  # the layer whose input each R sees
        model.vit.layers[1].attention.qkv_decorrelation: model.vit.layers[1].attention.q_proj,
        model.vit.layers[0].mlp.fc2_decorrelation: model.vit.layers[0].mlp.fc2,
    }
    captured = {d: [] for d in targets}
    for d, layer in targets.items():
        layer.register_forward_pre_hook(lambda _, args, d=d: captured[d].append(args[0].detach().reshape(-1, d.dim)))
    expected = {d: torch.eye(d.dim, dtype=torch.float64) for d in targets}
    for step in range(2):
        for d in targets:
            captured[d].clear()
        for micro_batch in range(2):
            model(inputs(seed=10 * step + micro_batch)[0]).loss.backward()
        model.decorrelation_step()
        for d in targets:
            rows = torch.cat(captured[d]).double()
            assert rows.shape[0] == 2 * 2 * 5  # two micro-batches of 2 images x (1 cls + 4 visible patches)
            z = rows @ expected[d].T
            X = z.T @ z / z.shape[0]
            C = X - torch.diag(torch.diagonal(X))
            v = torch.diagonal(X) - 1
            expected[d] = expected[d] - lr * ((1 - kappa) * C @ expected[d] + kappa * torch.diag(v) @ expected[d])
            torch.testing.assert_close(d.R.double(), expected[d], rtol=1e-5, atol=1e-6)


def test_statistics_count_training_forwards_once(tiny_kwargs):
    config = ViTMAEDBPConfig(**tiny_kwargs, decorrelation_sample_fraction=1.0)
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(config)
    qkv = model.vit.layers[0].attention.qkv_decorrelation
    patch = model.vit.embeddings.patch_embeddings.projection_decorrelation
    pixels, noise = inputs()
    model.eval()
    model(pixels, noise=noise)
    assert qkv.num_rows == 0  # evaluation never counts
    model.train()
    model(pixels, noise=noise).loss.backward()
    assert qkv.num_rows == 2 * 5  # q, k and v read each row once between them
    assert patch.num_rows == 2 * 16  # every patch, masked ones included
    reference = qkv.second_moment_sum().clone()
    qkv.reset_statistics()
    model.gradient_checkpointing_enable()
    model(pixels, noise=noise).loss.backward()  # the encoder layers re-run their forward in backward
    assert qkv.num_rows == 2 * 5
    torch.testing.assert_close(qkv.second_moment_sum(), reference)


def test_decorrelation_step_without_forwards_changes_nothing(tiny_kwargs):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
    assert model.decorrelation_step() is None
    assert all(torch.equal(d.R, torch.eye(d.dim)) for d in model.decorrelation_modules())


# --- merging ---------------------------------------------------------------------------------------------------------


def test_merge_returns_a_plain_model_with_the_same_outputs(tmp_path, tiny_kwargs):
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs)).eval()
    randomise_R(model, scale=0.1)
    merged = model.merge_decorrelation()
    assert type(merged) is ViTMAEForPreTraining
    assert merged.config.model_type == "vit_mae" and not hasattr(merged.config, "decorrelation_lr")
    assert not any("decorrelation" in name for name in merged.state_dict())
    pixels, noise = inputs()
    torch.testing.assert_close(
        merged(pixels, noise=noise).logits, model(pixels, noise=noise).logits, rtol=1e-4, atol=1e-5
    )
    merged.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit_mae"
    reloaded = ViTMAEForPreTraining.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(
        reloaded(pixels, noise=noise).logits, model(pixels, noise=noise).logits, rtol=1e-4, atol=1e-5
    )
    encoder = model.vit.merge_decorrelation()
    assert type(encoder) is ViTMAEModel
    torch.testing.assert_close(
        encoder(pixels, noise=noise).last_hidden_state,
        model.vit(pixels, noise=noise).last_hidden_state,
        rtol=1e-4,
        atol=1e-5,
    )


def test_package_exports():
    for name in ("ViTMAEDBPConfig", "ViTMAEDBPModel", "ViTMAEDBPForPreTraining", "DBPTrainer"):
        assert hasattr(hf_dbp, name)


def test_saved_checkpoint_loads_with_trust_remote_code_without_hf_dbp(tmp_path, tiny_kwargs):
    """A published DBP checkpoint carries its code: plain transformers loads it with trust_remote_code=True."""
    import subprocess
    import sys

    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs)).eval()
    randomise_R(model, scale=0.1)
    model.save_pretrained(tmp_path / "ckpt")
    code = {p.name: p.read_text() for p in (tmp_path / "ckpt").glob("*.py")}
    assert set(code) == {
        "modeling_vit_mae_dbp.py",
        "configuration_vit_mae_dbp.py",
        "config.py",
        "decorrelation.py",
        "collectives.py",
        "remote_code.py",
        "target_modules.py",
        "inject.py",
        "layers.py",
        "sampling.py",
        "step.py",
    }
    # hf_dbp's modules live in several packages; the checkpoint's copies import one another as siblings.
    assert not [line for text in code.values() for line in text.splitlines() if line.lstrip().startswith("from ..")]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_vit_mae_dbp.ViTMAEDBPConfig",
        "AutoModelForPreTraining": "modeling_vit_mae_dbp.ViTMAEDBPForPreTraining",
    }
    pixels, noise = inputs()
    torch.save({"pixels": pixels, "noise": noise, "logits": model(pixels, noise=noise).logits}, tmp_path / "io.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForPreTraining
model = AutoModelForPreTraining.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
io = torch.load({str(tmp_path / "io.pt")!r})
torch.testing.assert_close(model(io["pixels"], noise=io["noise"]).logits, io["logits"])
assert type(model).__name__ == "ViTMAEDBPForPreTraining" and "hf_dbp" not in sys.modules
# Saved again from the remote copy (a user fine-tunes it and publishes), it carries the same code and loads the same.
model.save_pretrained({str(tmp_path / "again")!r})
again = AutoModelForPreTraining.from_pretrained({str(tmp_path / "again")!r}, trust_remote_code=True).eval()
torch.testing.assert_close(again(io["pixels"], noise=io["noise"]).logits, io["logits"])
assert "hf_dbp" not in sys.modules
print("ok")
"""
    env = offline_env(tmp_path / "hf")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_the_same_seed_gives_a_dbp_model_the_plain_model_s_initial_weights(tiny_kwargs):
    """benchmarks/step_overhead.py and fair BP/DBP comparisons rely on it: injecting R draws no random numbers."""
    torch.manual_seed(0)
    dbp = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs)).merge_decorrelation()
    torch.manual_seed(0)
    plain = ViTMAEForPreTraining(ViTMAEConfig(**tiny_kwargs))
    assert all(torch.equal(value, plain.state_dict()[name]) for name, value in dbp.state_dict().items())


def test_a_checkpoint_of_hf_dbp_0_1_loads_with_every_R_exact_and_saves_in_todays_layout(tmp_path):
    """config.json of hf-dbp 0.1 held the DBP settings as fields of their own; they load into config.decorrelation,
    and every R and the outputs are those the old code saved (tests/fixtures/vit_mae_dbp_hf_dbp_0.1/README.md)."""
    folder = Path(__file__).parent / "fixtures" / "vit_mae_dbp_hf_dbp_0.1"
    expected = torch.load(folder / "expected.pt")
    for path in (folder, tmp_path / "resaved"):
        model = ViTMAEDBPForPreTraining.from_pretrained(path).eval()
        config = model.config
        assert (config.decorrelation_lr, config.decorrelation_kappa, config.decorrelation_sample_fraction) == (
            2e-3,
            0.05,
            0.5,
        )
        assert config.decorrelation_layers == ["patch_embeddings", "qkv", "fc2"]
        R = {n: p for n, p in model.named_parameters() if n.endswith("_decorrelation.R")}
        assert R.keys() == expected["R"].keys()
        assert all(torch.equal(R[n], expected["R"][n]) for n in R)
        with torch.no_grad():
            logits = model(pixel_values=expected["pixel_values"], noise=expected["noise"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
        model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "decorrelation_lr" not in saved and saved["decorrelation"]["lr"] == 2e-3
