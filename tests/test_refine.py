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
