"""xvr-batch finetune: self-supervised adaptation on an archive's key frames (real files, a tiny model)."""

from __future__ import annotations

import h5py
import pytest
import torch

from conftest import make_archive, sha256
from xvr_batch.finetune import FinetuneOptions, holdout_keys, run_finetune, training_targets
from xvr_batch.io.archive import Archive
from xvr_batch.model.checkpoint import read_untrusted

KEYS = (3, 11, 19, 27, 35, 43)


@pytest.fixture(scope="module")
def arc6(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("ft") / "six.h5", n=48, hr_index=KEYS)


def _opts(arc, out, weights, **kw):
    base = dict(archive=str(arc), out=str(out), weights=str(weights), steps=4, batch=2, crop=8, device="cpu",
                progress=False, val_every=0, ckpt_every=0, p_motion=0.5, motion_tries=2)
    base.update(kw)
    return FinetuneOptions(**base)


def test_holdout_and_targets():
    assert holdout_keys(6, 4) == [3]  # interior keys 1..4, the 3rd of every 4
    assert holdout_keys(12, 4) == [3, 7]
    assert holdout_keys(5, 100) == [2]  # at least one
    # brackets never touch a held-out key
    assert training_targets(6, [3], 2) == {1: [1], 2: [2]}


def test_finetune_cli_checkpoint_reconstructs(run_cli, arc6, tiny_weights, tmp_path):
    out = tmp_path / "ft.pt"
    before = tmp_path / "before.h5"  # a reconstruct first, in this process (inference-mode caches, then training)
    assert run_cli("reconstruct", arc6, "-o", before, "--weights", tiny_weights, "-q", "--device", "cpu").code == 0
    r = run_cli("finetune", arc6, "-o", out, "--weights", tiny_weights, "--steps", "3", "--batch", "2",
                "--crop", "8", "--device", "cpu", "-q")
    assert r.code == 0, r.err
    assert r.out.strip() == str(out) and "validate" in r.err
    ckpt = read_untrusted(out)
    meta = ckpt["meta"]
    assert meta["kind"] == "finetune" and ckpt["step"] == 3 and "optimizer" not in ckpt  # slim
    rec = meta["finetune"]
    assert rec["base_weights"]["sha256"] == sha256(tiny_weights)
    with Archive(arc6) as a:
        assert rec["archive"]["fingerprint"] == a.fingerprint()
    assert rec["holdout_keys"] == [3] and rec["holdout_frames"] == [27] and rec["train_keys"] == [1, 2]
    for side in ("validate_before", "validate_after"):
        assert isinstance(rec[side]["swin_xvr"]["psnr"], float) and [k["key"] for k in rec[side]["keys"]] == [3]
    recon = tmp_path / "recon.h5"
    r = run_cli("reconstruct", arc6, "-o", recon, "--weights", out, "-q", "--device", "cpu")
    assert r.code == 0, r.err
    with h5py.File(recon) as f:
        assert f["/exchange/data"].shape == (48, 32, 48)


def test_finetune_resumes_exactly(arc6, tiny_weights, tmp_path):
    straight = run_finetune(_opts(arc6, tmp_path / "a.pt", tiny_weights), log=lambda m: None)
    assert straight["out"] == str(tmp_path / "a.pt") and straight["after"] is not None
    stopped = run_finetune(_opts(arc6, tmp_path / "b.pt", tiny_weights, stop_at=2), log=lambda m: None)
    assert stopped["out"] == str(tmp_path / "b.last.pt") and stopped["after"] is None
    msgs = []
    again = run_finetune(_opts(arc6, tmp_path / "b.pt", tiny_weights), log=msgs.append)  # the same command
    assert again["out"] == str(tmp_path / "b.pt") and any("resume" in m for m in msgs)
    a, b = read_untrusted(tmp_path / "a.pt"), read_untrusted(tmp_path / "b.pt")
    for part in ("params", "params_ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert a["meta"]["finetune"]["validate_after"] == b["meta"]["finetune"]["validate_after"]


def test_finetune_refuses_too_few_keys(run_cli, tmp_path, tiny_weights):
    four = make_archive(tmp_path / "four.h5", n=30, hr_index=(3, 10, 17, 24))
    r = run_cli("finetune", four, "-o", tmp_path / "w.pt", "--weights", tiny_weights, "--device", "cpu", "-q")
    assert r.code == 2, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "at least 5 key frames" in lines[0] and "Traceback" not in r.err
    assert not (tmp_path / "w.pt").exists()


def test_training_crops_stay_where_the_hr_camera_sees():
    """On a registered archive the crops keep to the LR pixels whose HR footprint is in the seen rectangle."""
    from xvr_batch.finetune import _seen_lr
    assert _seen_lr((slice(None), slice(None)), (32, 40), 4, 24) == ((0, 32), (0, 40))
    assert _seen_lr((slice(5, 123), slice(9, 150)), (32, 40), 4, 24) == ((2, 30), (3, 37))
    # less than one crop left on an axis: that axis is not restricted
    assert _seen_lr((slice(5, 123), slice(9, 150)), (32, 40), 4, 31) == ((0, 32), (3, 37))
