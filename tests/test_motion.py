"""The motion step of ``--refine lr`` (:mod:`xvr_batch.motion`): key frames moved to the LR frame where an object
moved beyond the network's reach, and nothing moved where nothing did."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xvr_batch.motion import motion_fuse

S = 4  # the LR camera bins 4 x 4


def _bin(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x[:, None], S)[:, 0]


def _scene(shift: tuple[int, int] = (0, 0), seed: int = 0) -> torch.Tensor:
    """A textured background (transmission 0.6-0.9, HR 96 x 96) with a dark disc (radius 9 HR px) at (40, 40) +
    ``shift`` HR pixels."""
    g = torch.Generator().manual_seed(seed)
    bg = F.interpolate(torch.rand(1, 1, 12, 12, generator=g, dtype=torch.float64), size=(96, 96), mode="bicubic",
                       align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(96.0, dtype=torch.float64), torch.arange(96.0, dtype=torch.float64),
                            indexing="ij")
    disc = ((yy - 40 - shift[0]) ** 2 + (xx - 40 - shift[1]) ** 2 < 81).to(torch.float64)
    return (0.6 + 0.3 * bg) * (1 - 0.5 * disc)  # 1, 96, 96


def _fuse(out, truth, keys, sigma=0.005, noise_seed=1, gain=1.0, ok=None):
    """motion_fuse of one frame whose LR frame is the binned ``truth`` (times ``gain``) plus noise ``sigma``, the
    keys' LR frames their own binned keys plus noise."""
    g = torch.Generator().manual_seed(noise_seed)
    lr = gain * _bin(truth) + sigma * torch.randn(1, 24, 24, generator=g, dtype=torch.float64)
    key_lr = _bin(keys)[None] + sigma * torch.randn(1, 2, 24, 24, generator=g, dtype=torch.float64)
    ok = torch.ones(1, 24, 24, dtype=torch.bool) if ok is None else ok
    return motion_fuse(out, lr, ok, keys[None], key_lr, torch.ones(1, 2, 24, 24, dtype=torch.bool),
                       torch.tensor([0.5], dtype=torch.float64), sigma, S)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def test_an_object_moved_beyond_the_network_is_taken_from_the_moved_keys():
    """Both keys show the disc at (40, 40); in the frame it sits 5 HR px down and 3 right (about one LR pixel), and
    the network kept the key frames' disc (a ghost). The fused frame follows the moved disc. One displacement per
    5 x 5 LR window also moves the textured background beside the disc's edge, so the error halves rather than
    vanishes."""
    keys = torch.cat([_scene(), _scene()])
    truth = _scene((5, 3))
    ghost = _scene()
    fused = _fuse(ghost, truth, keys)
    assert _rmse(ghost, truth) > 0.05
    assert _rmse(fused, truth) < 0.6 * _rmse(ghost, truth), (_rmse(fused, truth), _rmse(ghost, truth))  # 0.026, 0.054
    ghosted = (ghost - truth).abs() > 0.05  # where the disc left and where it arrived
    assert _rmse(fused[ghosted], truth[ghosted]) < 0.5 * _rmse(ghost[ghosted], truth[ghosted])  # 0.14, 0.36


def test_a_static_scene_is_left_about_as_it_was():
    """Nothing moved: the output (the truth) stays within a fraction of the LR noise of what it was."""
    truth = _scene()
    keys = torch.cat([truth, truth])
    fused = _fuse(truth, truth, keys)
    assert _rmse(fused, truth) < 0.2 * 0.005, _rmse(fused, truth)


def test_a_flickering_beam_is_not_taken_for_motion():
    """The beam is 6 % brighter in the frame than at the keys, and the network followed it: nothing moves, and the
    output keeps the frame's beam."""
    truth = _scene()
    keys = torch.cat([truth, truth])
    fused = _fuse(1.06 * truth, 1.06 * truth, keys, gain=1.0)
    assert _rmse(fused, 1.06 * truth) < 0.002, _rmse(fused, 1.06 * truth)


def test_unmeasured_lr_pixels_move_nothing():
    """The LR pixels over the moved disc were not measured (clipped, defective): no window there is trusted, so
    the output is left as the network made it around the disc."""
    keys = torch.cat([_scene(), _scene()])
    truth = _scene((5, 3))
    ghost = _scene()
    ok = torch.ones(1, 24, 24, dtype=torch.bool)
    ok[0, 6:16, 6:16] = False  # LR rows/columns 6-15: HR 24-63, the disc and its move
    fused = _fuse(ghost, truth, keys, ok=ok)
    assert torch.equal(fused[0, 32:48, 32:48], ghost[0, 32:48, 32:48])


def test_tiny_noise_free_unmeasured_frames_are_left_alone():
    """Frames of one LR pixel, a noise level of 0 and nothing measured: finite, and exactly the network's output."""
    out = torch.rand(2, 4, 4)
    args = (torch.rand(2, 1, 1), torch.zeros(2, 1, 1, dtype=torch.bool), torch.rand(2, 2, 4, 4), torch.rand(2, 2, 1, 1),
            torch.ones(2, 2, 1, 1, dtype=torch.bool), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(motion_fuse(out, *args, 0.0, S), out)
    assert torch.isfinite(motion_fuse(out, args[0], ~args[1], *args[2:], 0.0, S)).all()


def test_each_frame_is_fused_as_if_it_were_alone():
    """A batch of frames gives, byte for byte, what each frame gives alone (outputs stay identical across unit
    sizes and backends)."""
    g = torch.Generator().manual_seed(5)
    n = 3
    out = torch.rand(n, 32, 32, generator=g)
    lr = _bin(out) + 0.01 * torch.randn(n, 8, 8, generator=g)
    ok = torch.rand(n, 8, 8, generator=g) > 0.1
    keys = torch.rand(n, 2, 32, 32, generator=g)
    key_lr = torch.rand(n, 2, 8, 8, generator=g)
    key_ok = torch.ones(n, 2, 8, 8, dtype=torch.bool)
    w = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    both = motion_fuse(out, lr, ok, keys, key_lr, key_ok, w, 0.01, S, 0.1, 0.9)
    for i in range(n):
        alone = motion_fuse(out[i:i + 1], lr[i:i + 1], ok[i:i + 1], keys[i:i + 1], key_lr[i:i + 1],
                            key_ok[i:i + 1], w[i:i + 1], 0.01, S, 0.1, 0.9)
        assert torch.equal(both[i], alone[0])


def test_occluder_end_to_end(tmp_path, with_and_without):
    """An archive with a moving occluder: the motion step brings the output closer to the truth than the same
    refinement without it, byte-identically across unit sizes and batches."""
    from xvr_batch.synth import synthesize

    arc = tmp_path / "occluder.h5"
    synthesize(str(arc), n_frames=33, hr_shape=(64, 64), stride=16, families=["occluder"], seed=29010)
    data, psnr = with_and_without(arc, "motion", ("denoise", "residual", "beam", "blind"))
    assert np.array_equal(data["with"], data["with_units"])
    assert psnr["with"] > psnr["without"] + 0.3, psnr  # measured: 24.59 vs 24.19 dB
