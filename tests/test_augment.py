"""Augmentation: per-view crop + resize keeps geometry (intrinsics follow), depth stays nearest,
colour jitter is shared across views."""

from __future__ import annotations

import torch

from xwam_core.data.augment import AugmentConfig, augment_batch


def test_crop_moves_intrinsics_with_the_image():
    b, v, t, h, w = 2, 3, 2, 40, 48
    rgb = torch.zeros(b, v, t, 3, h, w)
    u, vv = 30, 12  # bright 2x2 block: pixel centres at integers, so its centre is at (30.5, 12.5)
    rgb[..., u : u + 2] = 0
    rgb[:, :, :, :, vv : vv + 2, u : u + 2] = 1.0
    k = torch.tensor([[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]]).expand(b, v, t, 3, 3).clone()
    depth = torch.rand(b, v, t, h, w) + 0.5
    cfg = AugmentConfig(crop_scale=0.8, brightness=0, contrast=0, saturation=0, hue=0)
    out, out_depth, out_k = augment_batch(rgb, depth, k, cfg, torch.Generator().manual_seed(0))
    # the 3-D point that projects to the block centre (31, 13) under K, re-projected with K'
    x = (30.5 - k[..., 0, 2]) / k[..., 0, 0]
    y = (12.5 - k[..., 1, 2]) / k[..., 1, 1]
    u2 = out_k[..., 0, 0] * x + out_k[..., 0, 2]
    v2 = out_k[..., 1, 1] * y + out_k[..., 1, 2]
    for i in range(b):
        for j in range(v):
            img = out[i, j, 0, 0]
            ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
            cu, cv = (img * xs).sum() / img.sum(), (img * ys).sum() / img.sum()  # block centroid
            assert abs(float(cu - u2[i, j, 0])) < 0.3 and abs(float(cv - v2[i, j, 0])) < 0.3
    # different views got different crops; every frame of a view the same crop
    assert len({tuple(out_k[0, j, 0].flatten().tolist()) for j in range(v)}) > 1
    torch.testing.assert_close(out_k[:, :, 0], out_k[:, :, 1])
    # nearest resize: no invented depth values
    assert torch.isin(out_depth, depth).all()


def test_colour_jitter_shared_across_views_and_frames():
    torch.manual_seed(0)
    b, v, t, h, w = 3, 2, 2, 16, 16
    one_view = torch.rand(b, 1, 1, 3, h, w)
    rgb = one_view.expand(b, v, t, 3, h, w).clone()
    depth = torch.ones(b, v, t, h, w)
    k = torch.eye(3).expand(b, v, t, 3, 3).clone()
    out, _, _ = augment_batch(rgb, depth, k, AugmentConfig(crop_scale=1.0), torch.Generator().manual_seed(1))
    for j in range(v):
        for f in range(t):
            torch.testing.assert_close(out[:, j, f], out[:, 0, 0])
    assert not torch.allclose(out, rgb)  # something was jittered
    assert not torch.allclose(out[0], out[1] * (out[0].mean() / out[1].mean()))  # per-sample factors differ
    assert out.min() >= 0 and out.max() <= 1


def test_disabled_is_identity():
    rgb, depth, k = (
        torch.rand(1, 1, 1, 3, 8, 8),
        torch.rand(1, 1, 1, 8, 8),
        torch.eye(3).expand(1, 1, 1, 3, 3),
    )
    a, d, kk = augment_batch(rgb, depth, k, AugmentConfig(enabled=False))
    assert a is rgb and d is depth and kk is k
