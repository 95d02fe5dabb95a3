"""Metrics against independent references: scikit-image, hand-computed arrays, LPIPS plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xwam_core import metrics
from xwam_core.errors import XWAMError
from xwam_core.metrics import (
    LPIPS_WEIGHTS_ENV,
    METRICS,
    LPIPSMetric,
    action_l1,
    action_mse,
    depth_abs_rel,
    depth_delta1,
    parse_metrics,
    psnr,
    ssim,
)

skimage_metrics = pytest.importorskip("skimage.metrics")


def image_pairs() -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, prediction, target, data_range): random noise and structured scenes, float and uint8."""
    rng = np.random.default_rng(0)
    h, w = 40, 52
    yy, xx = np.mgrid[0:h, 0:w] / 10.0
    scene = np.stack([np.sin(xx + yy), np.cos(2 * xx) * np.sin(yy), (xx > 2.5) * 1.0 - 0.3 * yy], -1)
    scene = (scene - scene.min()) / np.ptp(scene)  # in [0, 1]
    blurred = (scene + np.roll(scene, 1, axis=0) + np.roll(scene, 1, axis=1)) / 3
    shifted = np.roll(scene, 2, axis=1)
    noise_a, noise_b = rng.uniform(size=(h, w, 3)), rng.uniform(size=(h, w, 3))
    as_uint8 = (scene * 255).round().astype(np.uint8)
    return [
        ("random", noise_a, noise_b, 1.0),
        ("random-correlated", noise_a, np.clip(noise_a + rng.normal(0, 0.1, noise_a.shape), 0, 1), 1.0),
        ("structured-blur", blurred, scene, 1.0),
        ("structured-shift", shifted, scene, 1.0),
        (
            "uint8",
            np.clip(as_uint8.astype(int) + rng.integers(-20, 21, as_uint8.shape), 0, 255).astype(np.uint8),
            as_uint8,
            255.0,
        ),
        ("gray", scene[..., :1], blurred[..., :1], 1.0),
    ]


@pytest.mark.parametrize("case", image_pairs(), ids=lambda c: c[0])
def test_psnr_matches_skimage(case: tuple[str, np.ndarray, np.ndarray, float]) -> None:
    _, pred, target, data_range = case
    reference = skimage_metrics.peak_signal_noise_ratio(target, pred, data_range=data_range)
    assert float(psnr(pred, target, data_range)) == pytest.approx(reference, abs=1e-6)
    assert float(psnr(torch.from_numpy(pred), torch.from_numpy(target), data_range)) == pytest.approx(
        reference, abs=1e-6
    )


@pytest.mark.parametrize("case", image_pairs(), ids=lambda c: c[0])
def test_ssim_matches_skimage(case: tuple[str, np.ndarray, np.ndarray, float]) -> None:
    _, pred, target, data_range = case
    reference = skimage_metrics.structural_similarity(
        pred.astype(np.float64),
        target.astype(np.float64),
        channel_axis=-1,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert float(ssim(pred, target, data_range)) == pytest.approx(reference, abs=1e-6)


def test_image_metrics_are_per_image_over_batches() -> None:
    cases = image_pairs()[:4]
    pred = np.stack([c[1] for c in cases]).reshape(2, 2, *cases[0][1].shape)  # (2, 2, H, W, 3)
    target = np.stack([c[2] for c in cases]).reshape(pred.shape)
    for fn in (psnr, ssim):
        batch = fn(pred, target, 1.0)
        assert batch.shape == (2, 2)
        single = [float(fn(c[1], c[2], 1.0)) for c in cases]
        np.testing.assert_allclose(batch.ravel(), single, rtol=1e-12)
    same = cases[2][2]
    assert psnr(same, same, 1.0) == np.inf
    assert float(ssim(same, same, 1.0)) == pytest.approx(1.0)
    with pytest.raises(XWAMError, match="at least 11x11"):
        ssim(np.zeros((8, 30, 3)), np.zeros((8, 30, 3)), 1.0)
    with pytest.raises(XWAMError, match="differ in shape"):
        psnr(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)), 1.0)


def test_depth_metrics_by_hand() -> None:
    gt = np.array([[1.0, 2.0, 4.0], [0.0, 5.0, 10.0]])  # 0: invalid ground truth, ignored
    pred = np.array([[1.1, 1.0, 4.0], [7.0, 6.5, -1.0]])
    # |pred - gt| / gt on the 5 valid pixels: 0.1, 0.5, 0, 0.3, 1.1 -> mean 2.0 / 5
    assert float(depth_abs_rel(pred, gt)) == pytest.approx(0.4)
    # max ratio: 1.1 (hit), 2 (miss), 1 (hit), 1.3 (miss), negative prediction (miss) -> 2 / 5
    assert float(depth_delta1(pred, gt)) == pytest.approx(0.4)
    valid = np.array([[True, False, True], [True, True, False]])
    assert float(depth_abs_rel(pred, gt, valid)) == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert float(depth_delta1(pred, gt, valid)) == pytest.approx(2 / 3)
    batch = np.stack([pred, gt, np.zeros_like(gt)])  # per map: the example, perfect, no valid pixel
    gts = np.stack([gt, gt, np.zeros_like(gt)])
    np.testing.assert_allclose(depth_abs_rel(batch, gts), [0.4, 0.0, np.nan])
    np.testing.assert_allclose(depth_delta1(batch, gts), [0.4, 1.0, np.nan])
    # The threshold is strict: a ratio of exactly 1.25 is a miss.
    assert float(depth_delta1(np.array([[1.25, 1.2]]), np.array([[1.0, 1.0]]))) == 0.5


def test_action_metrics_by_hand() -> None:
    target = np.zeros((2, 3, 2))  # (batch, chunk, dims)
    pred = np.zeros((2, 3, 2))
    pred[0, 0] = [1.0, 3.0]
    pred[1, 2] = [-2.0, 0.0]
    assert action_mse(pred, target) == pytest.approx((1 + 9 + 4) / 12)
    assert action_l1(torch.from_numpy(pred), torch.from_numpy(target)) == pytest.approx((1 + 3 + 2) / 12)
    with pytest.raises(XWAMError, match="must be equal"):
        action_l1(pred, target[..., :1])


# --- LPIPS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random AlexNet trunk with torchvision's keys and shapes, saved locally as safetensors and .pth."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shapes = {
        0: (64, 3, 11, 11),
        3: (192, 64, 5, 5),
        6: (384, 192, 3, 3),
        8: (256, 384, 3, 3),
        10: (256, 256, 3, 3),
    }  # torchvision.models.alexnet().features
    state = {}
    for index, shape in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"features.{index}.weight"] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(shape[0], generator=generator) * 0.01
    folder = tmp_path_factory.mktemp("alexnet")
    save_file(state, str(folder / "alexnet.safetensors"))
    torch.save(state, folder / "alexnet.pth")
    torch.save({"features.0.weight": state["features.0.weight"]}, folder / "partial.pth")
    return {
        "safetensors": folder / "alexnet.safetensors",
        "pth": folder / "alexnet.pth",
        "partial": folder / "partial.pth",
    }


def test_lpips_refuses_without_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    with pytest.raises(XWAMError, match=f"--lpips-weights PATH or set {LPIPS_WEIGHTS_ENV}") as err:
        LPIPSMetric()
    assert "\n" not in str(err.value)
    with pytest.raises(XWAMError, match="do not exist"):
        LPIPSMetric(tmp_path / "nowhere.safetensors")


def test_lpips_refuses_weights_that_are_not_alexnet(random_alexnet: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(XWAMError, match=r"missing 'features\.0\.bias'"):
        LPIPSMetric(random_alexnet["partial"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(XWAMError, match="not a safetensors or torch state-dict"):
        LPIPSMetric(junk)
    junk_safetensors = tmp_path / "junk.safetensors"
    junk_safetensors.write_bytes(b"\x00" * 16)
    with pytest.raises(XWAMError, match="not a safetensors or torch state-dict"):
        LPIPSMetric(junk_safetensors)


def test_lpips_plumbing_with_a_random_backbone(
    random_alexnet: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A random trunk gives numbers that are NOT LPIPS values: this tests the wiring only.
    monkeypatch.setattr(metrics, "LPIPS_BATCH", 2)  # 3 images: two chunks
    metric = LPIPSMetric(random_alexnet["safetensors"])
    trunk = metric.model.net.slice1[0].weight
    saved = torch.load(random_alexnet["pth"], weights_only=True)["features.0.weight"]
    assert torch.equal(trunk, saved)  # the local weights were loaded, not a fresh random init
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    others = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    same = metric(images.reshape(1, 3, 32, 32, 3), images.reshape(1, 3, 32, 32, 3))  # (batch, views, ...)
    assert same.shape == (1, 3) and np.allclose(same, 0.0, atol=1e-6)
    forward, backward = metric(images, others), metric(others, images)
    assert forward.shape == (3,) and (forward > 0).all()
    np.testing.assert_allclose(forward, backward, rtol=1e-5)
    np.testing.assert_allclose(metric(images[2], others[2]), forward[2], rtol=1e-5)
    np.testing.assert_allclose(
        metric(images[:1] / 255.0, others[:1] / 255.0, data_range=1.0), forward[:1], rtol=1e-4
    )
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(random_alexnet["pth"]))  # .pth through the env variable
    np.testing.assert_allclose(LPIPSMetric()(images[:1], others[:1]), forward[:1], rtol=1e-5)


# --- registry -----------------------------------------------------------------------------------


def test_metric_registry_and_parsing() -> None:
    assert list(METRICS) == [
        "psnr",
        "ssim",
        "lpips",
        "absrel",
        "delta1",
        "chamfer",
        "action_mse",
        "action_l1",
    ]
    assert [m.name for m in parse_metrics("psnr,chamfer")] == ["psnr", "chamfer"]
    assert [m.name for m in parse_metrics(" PSNR , ssim,psnr,")] == ["psnr", "ssim"]
    assert METRICS["lpips"].needs_weights and not METRICS["psnr"].needs_weights
    assert METRICS["psnr"].higher_is_better and not METRICS["chamfer"].higher_is_better
    with pytest.raises(
        XWAMError,
        match=r"unknown metric 'fid'; choose from psnr, ssim, lpips, absrel, delta1, "
        r"chamfer, action_mse, action_l1",
    ):
        parse_metrics("psnr,fid")
    with pytest.raises(XWAMError, match="empty"):
        parse_metrics(" , ")
