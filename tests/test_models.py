"""U-Net shapes, context/translation consistency, encoder, config and checkpoint round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssn_deploy.errors import ConfigError, InvalidInputError
from ssn_deploy.models import (
    ModelConfig,
    Normalization,
    build_model,
    load_checkpoint,
    save_checkpoint,
)

SMALL = ModelConfig(filters=(4, 6, 8), poolings=((1, 2, 2), (2, 2, 2)), embed_kernel=(1, 5, 5))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", [(2, 4, 4), (4, 8, 12), (6, 20, 16)])
@pytest.mark.parametrize("skip", ["concat", "add"])
def test_output_shape_equals_input_shape(shape, skip) -> None:
    cfg = ModelConfig(**{**SMALL.to_dict(), "skip": skip})
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *shape))
    assert out.shape == (2, 3, *shape)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_default_config_is_the_paper_architecture() -> None:
    cfg = ModelConfig()
    assert cfg.filters == (28, 36, 48, 64, 80)
    assert cfg.granularity == (1, 16, 16)
    model = build_model(ModelConfig(filters=(4, 4, 4, 4, 4)))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 3, 16, 32)).shape == (1, 3, 3, 16, 32)


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 6, 8), (2, 8, 10)])
def test_shape_not_multiple_of_granularity_is_a_clear_error(shape) -> None:
    model = build_model(SMALL)
    with pytest.raises(InvalidInputError, match=r"multiples of \(2, 4, 4\)"):
        model(torch.randn(1, 1, *shape))


def test_context_bounds_the_dependency_of_an_output_voxel() -> None:
    model = build_model(SMALL).eval()
    x = torch.randn(1, 1, 24, 96, 96, requires_grad=True)
    centre = (12, 48, 48)
    model(x)[0, :, centre[0], centre[1], centre[2]].sum().backward()
    nz = np.nonzero(x.grad[0, 0].abs().numpy() > 0)
    for axis, c in enumerate(SMALL.context):
        extent = max(centre[axis] - nz[axis].min(), nz[axis].max() - centre[axis])
        assert 0 < extent <= c


def test_translation_consistency_beyond_context() -> None:
    """A block offset by a multiple of the granularity predicts like the whole volume inside."""
    model = build_model(SMALL).eval()
    cz, cy, cx = SMALL.context
    big = torch.randn(1, 1, 48, 128, 128)
    z0, y0, x0 = 8, 16, 20
    shape = (2 * cz + 6, 2 * cy + 8, 2 * cx + 8)
    shape = tuple(s + (-s % g) for s, g in zip(shape, SMALL.granularity, strict=True))
    with torch.no_grad():
        whole = model(big)
        part = model(big[..., z0 : z0 + shape[0], y0 : y0 + shape[1], x0 : x0 + shape[2]])
    inner = (slice(cz, shape[0] - cz), slice(cy, shape[1] - cy), slice(cx, shape[2] - cx))
    ref = whole[..., z0 : z0 + shape[0], y0 : y0 + shape[1], x0 : x0 + shape[2]]
    torch.testing.assert_close(part[(..., *inner)], ref[(..., *inner)], atol=1e-5, rtol=1e-4)
    # ... while at the block border zero padding makes them differ.
    assert not torch.allclose(part[..., :2, :2, :2], ref[..., :2, :2, :2], atol=1e-3)


def test_encoder_embeds_to_last_filter_count_and_shares_weights() -> None:
    model = build_model(SMALL)
    encoder = model.encoder()
    assert encoder(torch.randn(3, 1, 4, 16, 16)).shape == (3, SMALL.filters[-1])
    assert encoder.embed_in[0].weight is model.embed_in[0].weight


def test_model_config_round_trip_and_errors() -> None:
    assert ModelConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError, match=r"model\.poolings"):
        ModelConfig(filters=(4, 8), poolings=((1, 2, 2), (1, 2, 2)))
    with pytest.raises(ConfigError, match=r"model\.skip"):
        ModelConfig(skip="sum")
    with pytest.raises(ConfigError, match="model: unknown key"):
        ModelConfig.from_dict({"filterz": [4]})


def test_normalization_is_global_and_fixed() -> None:
    norm = Normalization()
    assert np.allclose(norm(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    measured = Normalization.measure(np.full((4, 4), 51, np.uint8))
    assert measured.kind == "meanstd" and measured.mean == pytest.approx(0.2)


def test_checkpoint_round_trip_weights_only(tmp_path) -> None:
    model = build_model(SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    model(torch.randn(1, 1, 4, 8, 8)).mean().backward()
    opt.step()
    model.eval()
    gen = np.random.default_rng(7)
    gen.random(3)
    path = save_checkpoint(
        tmp_path / "m.ckpt",
        model,
        normalization=Normalization.measure(np.arange(256, dtype=np.uint8)),
        voxel_size=(10.0, 10.0, 10.0),
        iteration=12,
        optimizer=opt,
        generators={"sampler": gen},
        extra={"note": "x", "metrics": {"voi": 1.5}},
    )
    payload = torch.load(path, weights_only=True)
    assert payload["offsets"] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    assert payload["context"] == list(SMALL.context)
    ckpt = load_checkpoint(path)
    assert ckpt.config == SMALL and ckpt.iteration == 12 and ckpt.voxel_size == (10.0, 10.0, 10.0)
    assert ckpt.normalization.kind == "meanstd" and ckpt.extra["metrics"] == {"voi": 1.5}
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), model(x), atol=0, rtol=0)
    expected = gen.random(2)
    restored = np.random.default_rng(0)
    restored.bit_generator.state = ckpt.rng["numpy"]["sampler"]
    assert np.array_equal(restored.random(2), expected)
    opt2 = torch.optim.Adam(ckpt.model.parameters(), lr=1e-3, amsgrad=True)
    opt2.load_state_dict(ckpt.optimizer)


def test_load_checkpoint_rejects_foreign_files(tmp_path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InvalidInputError, match="not an ssn-deploy checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_changing_offsets_keeps_the_kept_channels_exactly() -> None:
    """Long-range auxiliary outputs are added before training on and cut before shipping;
    the nearest-neighbour channels must come through both steps unchanged."""
    from ssn_deploy.models.heads import NEAREST, with_offsets

    torch.manual_seed(0)
    model = build_model(ModelConfig(filters=(4, 8), poolings=((2, 2, 2),))).eval()
    longer = [*NEAREST, (-3, 0, 0), (0, 0, -9)]
    extended, rows = with_offsets(model, longer)
    assert rows == [0, 1, 2, 0, 2] and extended.config.offsets == tuple(longer)
    cut, rows_back = with_offsets(extended, NEAREST)
    assert rows_back == [0, 1, 2]
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        base, wide, back = model(x), extended(x), cut(x)
    assert torch.equal(back, base)  # same weights, same shapes: bit for bit
    # a head with more rows may sum in another order: equal to rounding
    torch.testing.assert_close(wide[:, :3], base, rtol=0, atol=1e-6)
    torch.testing.assert_close(wide[:, 3:], base[:, [0, 2]], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="axis-aligned"):
        with_offsets(model, [*NEAREST, (-1, -1, 0)])


def test_set_threshold_writes_a_copy_that_infer_and_export_carry(tmp_path) -> None:
    """``scripts/set_threshold.py``: the copy carries the new threshold (the model spec, which
    export writes into the ONNX metadata, and the predictor read it), remembers the trainer's,
    and the input is left as it was."""
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    from ssn_deploy.inference.loader import default_model, load_predictor
    from ssn_deploy.models.spec import ModelSpec

    source = default_model("torch", "aniso")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    script = Path(__file__).resolve().parents[1] / "scripts" / "set_threshold.py"
    out = tmp_path / "t.ckpt"
    args = [sys.executable, str(script), str(source), str(out), "--chosen-on", "a test"]
    done = subprocess.run([*args, "--threshold", "0.35"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spec = ModelSpec.from_checkpoint(load_checkpoint(out))
    assert spec.threshold == 0.35
    assert load_predictor(str(out), "torch").spec.threshold == 0.35
    best = load_checkpoint(out).extra["best"]
    recorded = load_checkpoint(source).extra["best"]
    assert best["trainer_threshold"] == recorded.get("trainer_threshold", recorded["threshold"])
    assert best["threshold_chosen_on"] == "a test"
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    refused = subprocess.run([*args, "--threshold", "1.5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "(0, 1)" in refused.stderr
