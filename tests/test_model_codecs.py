"""Codecs (pixel, Wan VAE) and the depth <-> inverse-depth image mapping."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from xwam_core.errors import XWAMError
from xwam_core.models.codecs import DepthRange, PixelCodec, WanVAECodec, depth_to_image, image_to_depth


def test_pixel_codec_round_trips_exactly():
    codec = PixelCodec(spatial_factor=8, temporal_factor=4)
    frames = torch.rand(2, 3, 9, 64, 64) * 2 - 1
    latents = codec.encode(frames)
    assert latents.shape == (2, 768, 3, 8, 8) == (2, *codec.latent_shape(9, 64, 64))
    assert codec.latent_channels == 768
    assert torch.equal(codec.decode(latents), frames)
    assert torch.equal(codec.encode(codec.decode(latents)), latents)


def test_pixel_codec_time_layout_matches_the_wan_vae():
    codec = PixelCodec(spatial_factor=2, temporal_factor=4)
    frames = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(1, 3, 9, 2, 2)  # frame t has value t
    latents = codec.encode(frames).view(1, 3, 4, 2, 2, 3, 1, 1)  # (B, 3, t, s, s, F, h, w)
    assert latents[0, 0, :, 0, 0, 0, 0, 0].tolist() == [0, 0, 0, 0]  # the first frame alone (repeated)
    assert latents[0, 0, :, 0, 0, 1, 0, 0].tolist() == [1, 2, 3, 4]
    assert latents[0, 0, :, 0, 0, 2, 0, 0].tolist() == [5, 6, 7, 8]


def test_pixel_codec_views_and_bad_shapes():
    codec = PixelCodec(8, 4)
    frames = torch.rand(2, 3, 3, 5, 16, 24) * 2 - 1  # (B, V, 3, T, H, W)
    latents = codec.encode_views(frames)
    assert latents.shape == (2, 3, 768, 2, 2, 3)
    assert torch.equal(codec.decode_views(latents), frames)
    with pytest.raises(XWAMError, match="1 \\+ 4k frames"):
        codec.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(XWAMError, match="divisible by 8"):
        codec.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(XWAMError, match="frames must be"):
        codec.encode(torch.zeros(1, 1, 5, 16, 16))


def test_depth_mapping_round_trips_metric_depth():
    depth_range = DepthRange(near=0.1, far=10.0)
    depth = torch.logspace(-1, 1, 500).view(1, 5, 10, 10)  # 0.1 m .. 10 m, (B, T, H, W)
    image = depth_to_image(depth, depth_range)
    assert image.shape == (1, 3, 5, 10, 10)
    assert image.min() >= -1 and image.max() <= 1
    assert torch.equal(image[:, 0], image[:, 2])
    assert image.flatten()[0] == 1.0 and image.flatten()[-1] == -1.0  # near -> +1, far -> -1
    recovered = image_to_depth(image, depth_range)
    assert ((recovered - depth).abs() / depth).max() < 0.005

    # Through the pixel codec too (the tiny recipe's path), with views.
    codec = PixelCodec(2, 4)
    frames = depth_to_image(depth[:, :5].reshape(1, 1, 5, 10, 10), depth_range)  # (B, V, 3, T, H, W)
    through = image_to_depth(codec.decode_views(codec.encode_views(frames)), depth_range)
    assert ((through - depth.view(1, 1, 5, 10, 10)).abs() / depth.view(1, 1, 5, 10, 10)).max() < 0.005


def test_depth_mapping_clamps_and_marks_invalid_as_far():
    depth_range = DepthRange(0.5, 4.0)
    depth = torch.tensor([0.0, -1.0, float("inf"), 0.1, 100.0, 2.0]).view(1, 1, 1, 6)
    image = depth_to_image(depth, depth_range)[0, 0, 0, 0]
    assert image[:3].tolist() == [-1.0, -1.0, -1.0]  # invalid -> far
    assert image[3] == 1.0 and image[4] == -1.0  # clamped to near / far
    with pytest.raises(XWAMError, match="depth range"):
        DepthRange(1.0, 0.5)


def test_per_view_depth_ranges_map_each_view_with_its_own_range():
    # a wrist camera (2-40 cm) beside a fixed one (1-3 m): each view round-trips within its own range
    depth_range = DepthRange(near=(1.0, 0.02), far=(3.0, 0.4))
    wrist = torch.linspace(0.03, 0.35, 60).view(1, 6, 10)
    fixed = torch.linspace(1.1, 2.9, 60).view(1, 6, 10)
    depth = torch.stack([fixed, wrist]).unsqueeze(0)  # (B=1, V=2, T=1, H=6, W=10)
    image = depth_to_image(depth, depth_range)  # (1, 2, 3, 1, 6, 10)
    assert image.shape == (1, 2, 3, 1, 6, 10)
    for v in range(2):  # the same as mapping the view alone with its range
        alone = depth_to_image(depth[:, v], depth_range.view(v))
        torch.testing.assert_close(image[:, v], alone)
    for v in range(2):  # both views spread over most of [-1, 1]
        assert image[0, v, 0].max() - image[0, v, 0].min() > 1.0
    recovered = image_to_depth(image, depth_range)
    assert ((recovered - depth).abs() / depth).max() < 1e-4
    # one shared range would clamp the wrist view to its near plane
    shared = image_to_depth(depth_to_image(depth, DepthRange(0.2, 3.0)), DepthRange(0.2, 3.0))
    assert ((shared - depth).abs() / depth)[:, 1].max() > 1.0
    assert depth_range.max_far == 3.0 and depth_range.to_json() == [[1.0, 0.02], [3.0, 0.4]]
    assert DepthRange.from_config([1.0, 0.02], [3.0, 0.4]) == depth_range
    assert DepthRange.from_config(0.1, 10) == DepthRange(0.1, 10.0)
    with pytest.raises(XWAMError, match="2 views, the depth has 3"):
        depth_to_image(torch.ones(1, 3, 1, 4, 4), depth_range)
    with pytest.raises(XWAMError, match="same length"):
        DepthRange((0.1, 0.2), (1.0,))
    with pytest.raises(XWAMError, match=r"near=0\.5, far=0\.4"):
        DepthRange((0.1, 0.5), (1.0, 0.4))


@pytest.fixture(scope="module")
def tiny_vae():
    # Wan2.2 VAE layout (residual, patch 2, spatial 16, temporal 4) at toy width.
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
    )


def test_wan_vae_codec_normalises_and_stays_frozen(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path / "vae")
    codec = WanVAECodec.from_pretrained(tmp_path)  # pipeline folder with vae/
    assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (4, 16, 4)
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training

    frames = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = codec.encode(frames)
    assert latents.shape == (1, *codec.latent_shape(5, 16, 16)) == (1, 4, 2, 1, 1)
    with torch.no_grad():
        raw = tiny_vae.encode(frames).latent_dist.mode()
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)

    decoded = codec.decode(latents)
    assert decoded.shape == frames.shape and decoded.abs().max() <= 1
    with torch.no_grad():
        expected = tiny_vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


def test_wan_vae_codec_bad_folder(tmp_path):
    with pytest.raises(XWAMError, match=r"no config\.json"):
        WanVAECodec.from_pretrained(tmp_path)


def test_linear_depth_encoding_is_the_releases_reading_of_its_8bit_depth():
    """A store of `xwam prepare xwam-release` keeps the release's 8-bit depth value v as v + 1 mm; the
    linear encoding over [0.001, 0.256] m turns it into exactly the release's image, v / 127.5 - 1."""
    import torch

    from xwam_core.data.sources.xwam_release import relative_depth_to_metres
    from xwam_core.models.codecs import DepthRange, depth_to_image, image_to_depth

    values = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16)  # (T, ..., H, W)
    metres = torch.from_numpy(relative_depth_to_metres(values.numpy()))
    rng = DepthRange(0.001, 0.256, "linear")
    image = depth_to_image(metres, rng)  # (1, 3, 1, 16, 16)
    torch.testing.assert_close(image[:, 0], values / 127.5 - 1.0, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_to_depth(image, rng), metres, atol=1e-7, rtol=1e-5)
    # per view, and the inverse encoding is still the default
    per_view = DepthRange.from_config([0.001, 0.1], [0.256, 5.0], "linear")
    assert per_view.view(1) == DepthRange(0.1, 5.0, "linear")
    assert DepthRange(0.1, 5.0).encoding == "inverse"


def test_a_bad_depth_encoding_is_one_line():
    import pytest

    from xwam_core.errors import XWAMError
    from xwam_core.models.codecs import DepthRange
    from xwam_core.models.presets import build_model

    with pytest.raises(XWAMError, match="depth_encoding='log': expected one of inverse, linear"):
        DepthRange(0.1, 1.0, "log")
    with pytest.raises(XWAMError, match="depth_encoding='log'"):
        build_model("tiny", depth_encoding="log")
    model = build_model("tiny", depth_encoding="linear", depth_near=0.001, depth_far=0.256)
    assert model.depth_range == DepthRange(0.001, 0.256, "linear")
