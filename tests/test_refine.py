"""LR refinement and denoising (xvr_batch.refine): unit behaviour, and an end-to-end archive where the network
misses an object that the LR frames show."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xvr_batch.refine import TRAINED_SIGMA, lr_denoise, lr_refine, needs_denoise


def _bin(x: torch.Tensor, s: int = 4) -> torch.Tensor:
    return F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), s).view(*x.shape[:-2], x.shape[-2] // s, x.shape[-1] // s)


def test_consistent_output_is_left_alone():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 64, 64, generator=g)
    sigma = 0.02
    lr = _bin(y) + sigma * torch.randn(2, 3, 16, 16, generator=g)  # the output explains its LR frames up to noise
    z = lr_refine(y, lr, sigma, [0, 1, 2], 4)
    # the shrink keeps little of pure noise: the output moves by far less than the noise
    assert float((z - y).pow(2).mean().sqrt()) < 0.35 * sigma


def test_missed_object_is_restored():
    g = torch.Generator().manual_seed(1)
    truth = torch.full((1, 1, 64, 64), 0.5)
    truth[..., 20:44, 24:48] = 0.9  # an object the network did not put in
    y = torch.full_like(truth, 0.5)
    sigma = 0.01
    lr = _bin(truth) + sigma * torch.randn(1, 1, 16, 16, generator=g)
    z = lr_refine(y, lr, sigma, [0], 4)
    before = float((y - truth).pow(2).mean())
    after = float((z - truth).pow(2).mean())
    assert after < 0.25 * before  # > 6 dB closer to the truth
    # and it now agrees with its LR frame to within a few noise levels
    assert float((_bin(z) - lr).pow(2).mean().sqrt()) < 3 * sigma + 0.02


def test_slots_pick_the_lr_frame_of_each_output():
    y = torch.zeros(1, 1, 16, 16)
    lr = torch.zeros(1, 3, 4, 4)
    lr[0, 2] = 1.0  # only frame 2 departs
    assert float(lr_refine(y, lr, 0.01, [0], 4).abs().max()) == 0.0
    assert float(lr_refine(y, lr, 0.01, [2], 4).mean()) > 0.5


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        lr_refine(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 5, 4), 0.01, [0], 4)


def test_denoise_only_above_the_trained_noise():
    g = torch.Generator().manual_seed(2)
    blend = torch.full((1, 4, 48, 48), 0.5)
    quiet = blend + 0.02 * torch.randn(1, 4, 48, 48, generator=g)
    assert not needs_denoise(0.02) and needs_denoise(TRAINED_SIGMA * 2) and not needs_denoise(None)
    assert lr_denoise(quiet, blend, 0.02) is quiet
    sigma = 0.1
    noisy = blend + sigma * torch.randn(1, 4, 48, 48, generator=g)
    noisy[..., 18:30, 18:30] += 0.6  # a real change since the key frames
    out = lr_denoise(noisy, blend, sigma)
    static = torch.ones(48, 48, dtype=torch.bool)
    static[12:36, 12:36] = False  # farther than one window from the change
    # where nothing changed the noise drops well below sigma; the change survives
    assert float((out - blend)[..., static].pow(2).mean().sqrt()) < 0.5 * sigma
    assert float((out - noisy)[..., 20:28, 20:28].abs().mean()) < 0.1 * 0.6


@pytest.mark.parametrize("refine", ["lr", "none"])
def test_reconstruct_refine_end_to_end(tmp_path, refine):
    """An occluder the key frames do not show: --refine lr follows the LR frames, and beats --refine none."""
    from xvr_batch.driver import reconstruct
    from xvr_batch.evaluate import evaluate
    from xvr_batch.pipeline import Options
    from xvr_batch.synth import synthesize

    arc = tmp_path / "occ.h5"
    synthesize(str(arc), n_frames=25, hr_shape=(64, 64), stride=12, families=["occluder"], seed=29010)
    scores = {}
    for kind in ("none", refine):
        out = tmp_path / f"{kind}.h5"
        reconstruct(Options(archive=str(arc), output=str(out), overwrite=True, force_replan=True, refine=kind),
                    progress=False)
        with h5py.File(out, "r") as f:
            assert f["/process/xvr_batch"].attrs["settings"].count(f'"refine": "{kind}"') == 1
        scores[kind] = evaluate(str(out), str(arc))["methods"]["swin_xvr"]["mean_psnr"]
    if refine == "lr":
        assert scores["lr"] > scores["none"] + 0.5


def test_noisy_archive_is_denoised_and_byte_identical_across_units(tmp_path):
    """A low-dose archive (sigma above TRAINED_SIGMA): the denoised, refined output does not depend on how the
    frames are cut into units and batches."""
    from xvr_batch.driver import reconstruct
    from xvr_batch.pipeline import Options
    from xvr_batch.synth import synthesize

    arc = tmp_path / "dim.h5"
    synthesize(str(arc), n_frames=33, hr_shape=(64, 64), stride=8, families=["particles"], seed=5, lr_dose=60.0)
    data = {}
    for unit, batch in ((128, 4), (10, 3)):
        out = tmp_path / f"u{unit}.h5"
        reconstruct(Options(archive=str(arc), output=str(out), overwrite=True, force_replan=True, unit_frames=unit,
                            batch=batch), progress=False)
        with h5py.File(out, "r") as f:
            data[unit] = f["/exchange/data"][...]
            sigma = float(f["/exchange/lr_consistency"].attrs["sigma"])
    assert needs_denoise(sigma), sigma
    assert np.array_equal(data[128], data[10])


def _beam_scene(gain: float, bias: float = 0.93, sigma: float = 0.01, seed: int = 3):
    """A static scene (flat-fielded intensity, LR 24 x 24) seen by both cameras; the LR camera reads ``bias`` times
    the HR camera at every instant (a calibration error), and the beam at frame t is ``gain`` times the keys'."""
    g = torch.Generator().manual_seed(seed)
    scene = 0.3 + 0.6 * torch.rand(24, 24, generator=g)
    keys = torch.stack([scene, scene])
    key_lr = bias * keys + sigma * torch.randn(2, 24, 24, generator=g)
    lr = bias * gain * scene + sigma * torch.randn(24, 24, generator=g)
    ok = torch.ones(24, 24, dtype=torch.bool)
    return scene, keys, key_lr, lr, ok


def test_beam_gain_follows_a_flicker_and_ignores_a_static_bias():
    from xvr_batch.refine import beam_gains

    scene, keys, key_lr, lr, ok = _beam_scene(gain=1.04)
    key_ok = torch.stack([ok, ok])
    g = beam_gains(scene, lr, ok, keys, key_lr, key_ok, 0.5)  # the output built from the keys: the keys' beam
    assert abs(float(g) - 1.04) < 0.006, g
    # no flicker: the static 7 % disagreement between the cameras is not mistaken for one
    scene, keys, key_lr, lr, ok = _beam_scene(gain=1.0, seed=4)
    g = beam_gains(scene, lr, ok, keys, key_lr, key_ok, 0.3)
    assert abs(float(g) - 1.0) < 0.002, g


def test_beam_gain_leaves_noise_alone_and_skips_unmeasured_pixels():
    from xvr_batch.refine import BEAM_MIN_PIXELS, beam_gains

    # pure noise: the gain is shrunk to exactly 1 in most frames, and never far from it
    gains = []
    for seed in range(20):
        scene, keys, key_lr, lr, ok = _beam_scene(gain=1.0, sigma=0.05, seed=seed)
        gains.append(float(beam_gains(scene, lr, ok, keys, key_lr, torch.stack([ok, ok]), 0.5)))
    assert sum(g == 1.0 for g in gains) >= 15 and max(abs(g - 1.0) for g in gains) < 0.02, gains
    # clipped pixels (marked unmeasured) that read far too dark do not bend the estimate
    scene, keys, key_lr, lr, ok = _beam_scene(gain=1.05, seed=7)
    lr[:, :10] = 0.2
    ok[:, :10] = False
    assert abs(float(beam_gains(scene, lr, ok, keys, key_lr, torch.stack([ok, ok]), 0.5)) - 1.05) < 0.008
    # too few measured pixels: no gain at all
    few = torch.zeros_like(ok)
    few.view(-1)[:BEAM_MIN_PIXELS - 1] = True
    assert float(beam_gains(scene, lr, few, keys, key_lr, torch.stack([few, few]), 0.5)) == 1.0


def test_beam_gains_of_a_batch_are_those_of_each_frame_alone():
    """Byte identity across batches rests on this: a frame's gain does not depend on the frames beside it."""
    from xvr_batch.refine import beam_gains

    frames = [_beam_scene(gain=g, sigma=0.02, seed=10 + i) for i, g in enumerate((1.0, 1.03, 0.96, 1.08))]
    frames[2][4][:, :20] = False  # one frame with few measured pixels left
    frames[3][4][:] = False  # and one with none
    args = [torch.stack([f[k] for f in frames]) for k in (0, 3, 4)]  # out, lr, ok
    keys = torch.stack([f[1] for f in frames])
    key_lr = torch.stack([f[2] for f in frames])
    key_ok = torch.stack([torch.stack([f[4], f[4]]) for f in frames])
    weights = torch.tensor([0.1, 0.5, 0.9, 0.5], dtype=torch.float64)
    batch = beam_gains(args[0], args[1], args[2], keys, key_lr, key_ok, weights)
    alone = [beam_gains(args[0][i], args[1][i], args[2][i], keys[i], key_lr[i], key_ok[i], float(weights[i]))
             for i in range(4)]
    assert torch.equal(batch, torch.stack(alone))
    assert float(batch[3]) == 1.0 and abs(float(batch[1]) - 1.03) < 0.01


def test_apply_gains_scales_the_intensity_not_the_model_units():
    from xvr_batch.refine import apply_gains

    lo, span = 0.2, 0.8
    y = torch.rand(2, 3, 8, 8)
    gains = torch.tensor([[1.0, 1.1, 0.9], [1.0, 1.0, 1.2]])
    z = apply_gains(y, gains, lo, span)
    assert torch.allclose(lo + span * z, (lo + span * y) * gains[:, :, None, None], atol=1e-6)
    assert torch.equal(z[0, 0], y[0, 0])


def test_flickering_beam_end_to_end(tmp_path, with_and_without):
    """An archive whose beam flickers: the beam step brings the output closer to the truth than the same
    refinement without it, and the output stays byte-identical across unit sizes and batches."""
    from xvr_batch.synth import synthesize

    arc = tmp_path / "flicker.h5"
    synthesize(str(arc), n_frames=33, hr_shape=(64, 64), stride=16, families=["particles"], seed=29008,
               effects=["flicker"])
    data, psnr = with_and_without(arc, "beam", ("denoise", "motion", "residual"))
    assert np.array_equal(data["with"], data["with_units"])
    assert psnr["with"] > psnr["without"] + 0.3, psnr  # measured: 34.23 vs 33.77 dB


def test_apply_gains_gives_the_blind_gain_under_unmeasured_lr_pixels():
    from xvr_batch.refine import apply_gains

    lo, span = 0.1, 0.9
    y = torch.rand(1, 2, 8, 8)
    gains = torch.tensor([[1.02, 0.97]])
    blind_gains = torch.tensor([[0.9, 1.1]])
    blind = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    blind[0, 0, 0, 1] = True  # LR pixel (0, 1) of frame 0: HR rows 0-3, columns 4-7
    z = apply_gains(y, gains, lo, span, blind_gains, blind)
    want = torch.full((1, 2, 8, 8), 1.0)
    want[0, 0] = 1.02
    want[0, 0, :4, 4:] = 0.9
    want[0, 1] = 0.97
    assert torch.allclose(lo + span * z, (lo + span * y) * want, atol=1e-6)


def test_blind_gain_follows_the_beam_where_the_output_did_not_and_is_the_frame_gain_elsewhere():
    from xvr_batch.refine import beam_gains

    scene, keys, key_lr, lr, ok = _beam_scene(gain=1.04)
    ok[:10] = False  # 10 of 24 rows clipped in the LR frame (240 pixels)
    key_ok = torch.stack([ok, ok])
    w = torch.tensor([0.5], dtype=torch.float64)
    args = lambda out: (out[None], lr[None], ok[None], keys[None], key_lr[None], key_ok[None], w)
    # the network followed the LR frame where it measured, and built the blind rows from the keys (29012)
    followed = torch.where(ok, 1.04 * scene, scene)
    g = beam_gains(*args(followed))
    assert abs(float(g) - 1.0) < 0.002, g
    assert abs(float(beam_gains(*args(followed), blind=True)[1]) - 1.04) < 0.006
    # the network followed nothing: the frame's gain, and the blind rows need no other one
    g = beam_gains(*args(scene))
    assert abs(float(g) - 1.04) < 0.006, g
    assert float(beam_gains(*args(scene), blind=True)[1]) == float(g)
    # the network followed the beam everywhere: gain 1 for both
    g = beam_gains(*args(1.04 * scene))
    assert float(g) == 1.0 and float(beam_gains(*args(1.04 * scene), blind=True)[1]) == 1.0


def test_clipped_lr_under_a_flickering_beam_end_to_end(tmp_path, with_and_without):
    """A beam that flickers over a scene whose bright part clips in the LR camera (18 % of its pixels): the output
    there was the key frames' beam until the blind gain; now it follows the frame's beam, byte-identically across
    unit sizes."""
    from xvr_batch.synth import synthesize

    arc = tmp_path / "clipped_flicker.h5"
    synthesize(str(arc), n_frames=33, hr_shape=(64, 64), stride=16, families=["particles"], seed=29102,
               effects=["flicker", "saturation"])
    with h5py.File(arc, "r") as f:
        assert (f["/exchange/data_lr"][...] >= 65535).mean() > 0.1
    data, psnr = with_and_without(arc, "blind", ("denoise", "motion", "residual", "beam"))
    assert np.array_equal(data["with"], data["with_units"])
    assert psnr["with"] > psnr["without"] + 0.5, psnr  # measured: 32.73 vs 31.64 dB
