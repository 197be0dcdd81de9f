"""The core pipeline on real files: chunking invisible, resume after SIGKILL, refusal of changes, lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import cli, make_archive, read_data, sha256
from xvr_batch.errors import UserError
from xvr_batch.driver import reconstruct
from xvr_batch.pipeline import Options, finalise, pending_units, prepare, UnitRunner
from xvr_batch.plan import make_plan, plan_windows, segments


def _opts(archive, out, weights, **kw) -> Options:
    return Options(archive=str(archive), output=str(out), weights=str(weights), **kw)


# ------------------------------------------------------------------------------------------------ plan

@pytest.mark.parametrize("head", ["all", "centre"])
@pytest.mark.parametrize("n,keys,nl", [(40, (3, 11, 30), 3), (25, (0, 24), 3), (9, (0, 4, 8), 5), (2, (0, 1), 3),
                                       (30, (5, 6, 7, 20), 3), (17, (2, 9), 1)])
def test_every_frame_emitted_once_with_its_bracket(n, keys, nl, head):
    wins = plan_windows(n, keys, nl, head)
    emitted = [t for w in wins for t, _ in w.emit]
    assert sorted(emitted) == list(range(n))
    seg_of = {t: s for s in segments(n, keys) for t in range(s.start, s.stop)}
    for w in wins:
        assert len(w.frames) == nl and all(0 <= f < n for f in w.frames)
        for t, slot in w.emit:
            s = seg_of[t]
            assert w.keys == (s.key_prev, s.key_next)
            assert w.frames[slot] == t
    # frames before the first / after the last key frame use the nearest key frame on both sides
    assert seg_of[0].key_prev == seg_of[0].key_next or keys[0] == 0
    assert seg_of[n - 1].key_prev == seg_of[n - 1].key_next or keys[-1] >= n - 1


def test_units_cover_archive_and_share_global_batches():
    plan = make_plan(40, (3, 11, 30), 3, "all", unit_frames=7, batch=3)
    # nominal boundaries 7, 14, ... moved to the nearest batch boundary (batches of 3 windows: 9 frames here)
    assert [(u.start, u.stop) for u in plan.units][:2] == [(0, 9), (9, 17)]
    assert len(plan.units) == 6 and plan.units[-1].stop == 40
    assert all(a.stop == b.start for a, b in zip(plan.units, plan.units[1:]))
    for u in plan.units:
        b0, b1 = u.batches
        wins = plan.windows[b0 * 3:b1 * 3]
        assert {t for w in wins for t, _ in w.emit} >= set(range(u.start, u.stop))


# ------------------------------------------------------------------------------------------------ bytes

@pytest.mark.parametrize("weights_fixture", ["tiny_weights", "tiny_centre_weights"])
def test_chunking_is_invisible(tmp_path, archive, weights_fixture, request):
    weights = request.getfixturevalue(weights_fixture)
    ref = None
    for uf in (40, 1, 7, 13):
        out = reconstruct(_opts(archive, tmp_path / f"o{uf}.h5", weights, unit_frames=uf, batch=3), progress=False)
        data = read_data(out)
        assert data.shape == (40, 32, 48) and data.dtype == np.float32 and np.isfinite(data).all()
        if ref is None:
            ref = data
        assert data.tobytes() == ref.tobytes(), f"unit_frames={uf} differs from a single pass"
    assert not any(p.name.endswith(".xvr") for p in tmp_path.iterdir())  # work directories cleaned up


def test_output_layout_and_provenance(tmp_path, archive, tiny_weights):
    before = sha256(archive)
    out = reconstruct(_opts(archive, tmp_path / "o.h5", tiny_weights, unit_frames=16, dtype="uint16",
                            compression="zstd"), command=["xvr-batch", "reconstruct", "x"], progress=False)
    assert sha256(archive) == before  # the input is never modified
    with h5py.File(out, "r") as f:
        ds = f["/exchange/data"]
        assert ds.dtype == np.uint16 and ds.chunks == (1, 32, 48) and ds.attrs["compression"] == "zstd"
        assert list(f["/exchange/hr_index"][()]) == [3, 11, 30]
        proc = f["/process/xvr_batch"].attrs
        for key in ("version", "command_line", "config", "weights_sha256", "input", "normalisation", "plan",
                    "edge_policy"):
            assert key in proc, key
        assert json.loads(proc["input"])["fingerprint"]
        assert json.loads(proc["plan"])["n_frames"] == 40
        assert "nearest key frame" in proc["edge_policy"]
    if shutil.which("h5dump"):
        r = subprocess.run(["h5dump", "-H", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert 'DATASET "data"' in r.stdout and 'GROUP "xvr_batch"' in r.stdout


def test_output_in_hr_units_tracks_truth(tmp_path, tiny_weights):
    """Normalisation round trip: the output is in HR camera counts (same scale as the key frames)."""
    arc = make_archive(tmp_path / "a.h5", gt=True)
    out = reconstruct(_opts(arc, tmp_path / "o.h5", tiny_weights), progress=False)
    data = read_data(out)
    with h5py.File(arc) as f:
        hr = f["/exchange/data_hr"][()].astype(np.float32)
    assert 0.2 * hr.mean() < data.mean() < 5 * hr.mean()


# ------------------------------------------------------------------------------------------------ resume

def _partial_run(opts: Options, n_units: int):
    """Plan and run only the first ``n_units`` units, as a killed run would leave it."""
    job = prepare(opts)
    wd = job.workdir_obj()
    runner = UnitRunner(job)
    for unit in pending_units(job)[:n_units]:
        rec = runner.run_unit(unit)
        wd.record_done(rec["unit"], rec["part"], rec["sha256"], rec["frames"])
    runner.close()
    return job


def test_corrupt_and_missing_parts_are_redone(tmp_path, archive, tiny_weights):
    ref = read_data(reconstruct(_opts(archive, tmp_path / "ref.h5", tiny_weights, unit_frames=5), progress=False))
    opts = _opts(archive, tmp_path / "o.h5", tiny_weights, unit_frames=5)
    job = _partial_run(opts, 4)
    parts = sorted(Path(job.workdir, "parts").glob("unit-*.h5"))
    assert len(parts) == 4
    raw = bytearray(parts[1].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    parts[1].write_bytes(bytes(raw))  # corrupt
    parts[2].write_bytes(parts[2].read_bytes()[:100])  # truncated
    parts[3].unlink()  # missing
    assert len(pending_units(job)) == 8 - 1
    out = reconstruct(opts, progress=False)
    assert read_data(out).tobytes() == ref.tobytes()


def test_changed_input_config_or_weights_is_refused(tmp_path, archive, tiny_weights, tiny_centre_weights):
    opts = _opts(archive, tmp_path / "o.h5", tiny_weights, unit_frames=5)
    _partial_run(opts, 2)
    with pytest.raises(UserError, match=r"settings changed .*batch: 4 -> 2"):
        reconstruct(_opts(archive, tmp_path / "o.h5", tiny_weights, unit_frames=5, batch=2), progress=False)
    with pytest.raises(UserError, match="weights changed"):
        reconstruct(_opts(archive, tmp_path / "o.h5", tiny_centre_weights, unit_frames=5), progress=False)
    with h5py.File(archive, "r+") as f:  # the user replaced the data under the same name
        f["/exchange/data_lr"][0] = f["/exchange/data_lr"][0] + 1
    with pytest.raises(UserError, match="input archive changed"):
        reconstruct(opts, progress=False)
    opts.force_replan = True
    out = reconstruct(opts, progress=False)
    assert read_data(out).shape == (40, 32, 48)


def _run_cli_background(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "xvr_batch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("units_done", [0, 1, 4, 9])
def test_sigkill_at_any_moment_then_rerun_gives_identical_bytes(tmp_path, tiny_weights, units_done):
    """SIGKILL right after start (0) or right after the k-th unit is journaled, then the same command."""
    arc = make_archive(tmp_path / "a.h5", n=90, hr_index=(0, 20, 40, 60, 89))
    ref = read_data(reconstruct(_opts(arc, tmp_path / "ref.h5", tiny_weights, unit_frames=90), progress=False))
    args = ["reconstruct", arc, "-o", tmp_path / "o.h5", "--weights", tiny_weights, "--unit-frames", 3, "-q"]
    proc = _run_cli_background(args)
    journal = tmp_path / "o.h5.xvr" / "journal.jsonl"
    deadline = time.time() + 120
    while units_done and time.time() < deadline and proc.poll() is None and not (
            journal.exists() and journal.read_text().count("\n") >= units_done):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "o.h5").exists(), "the run finished before it could be killed; make it longer"
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert read_data(tmp_path / "o.h5").tobytes() == ref.tobytes()
    assert not list(tmp_path.glob(".o.h5.tmp-*"))


def test_second_process_is_refused_and_stale_lock_taken_over(tmp_path, archive, tiny_weights):
    wd = tmp_path / "o.h5.xvr"
    wd.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from xvr_batch.workdir import WorkDir\n"
        f"lk = WorkDir({str(wd)!r}).lock(); lk.acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    r = cli("reconstruct", archive, "-o", tmp_path / "o.h5", "--weights", tiny_weights)
    assert r.returncode == 2 and "in use by pid" in r.stderr and "Traceback" not in r.stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = cli("reconstruct", archive, "-o", tmp_path / "o.h5", "--weights", tiny_weights, "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.h5").exists()


def test_status_and_resume_commands(tmp_path, archive, tiny_weights):
    opts = _opts(archive, tmp_path / "o.h5", tiny_weights, unit_frames=10)
    job = _partial_run(opts, 2)
    wd = tmp_path / "o.h5.xvr"
    r = cli("status", wd, "--json", check=True)
    st = json.loads(r.stdout)
    done_frames = job.plan().units[1].stop  # units are cut at batch boundaries near 10, 20, 30
    assert len(st["done"]) == 2 and len(st["pending"]) == 2 and st["frames_done"] == done_frames
    r = cli("status", wd, check=True)
    assert "2/4 units done" in r.stdout
    r = cli("resume", wd, "-q", check=True)
    assert Path(r.stdout.strip()) == (tmp_path / "o.h5").resolve()
    assert read_data(tmp_path / "o.h5").shape == (40, 32, 48)


def test_finalise_refuses_unfinished(tmp_path, archive, tiny_weights):
    job = _partial_run(_opts(archive, tmp_path / "o.h5", tiny_weights, unit_frames=10), 1)
    with pytest.raises(UserError, match="units are not finished"):
        finalise(job)
    assert not (tmp_path / "o.h5").exists()


def test_tiled_reconstruction_close_to_untiled(tmp_path, tiny_weights):
    arc = make_archive(tmp_path / "a.h5", n=12, lr_shape=(24, 28), hr_index=(0, 11))
    full = read_data(reconstruct(_opts(arc, tmp_path / "f.h5", tiny_weights), progress=False))
    tiled = read_data(reconstruct(_opts(arc, tmp_path / "t.h5", tiny_weights, tile=16, tile_overlap=8),
                                  progress=False))
    rng = full.max() - full.min()
    psnr = 10 * np.log10(rng ** 2 / np.mean((full - tiled) ** 2))
    assert psnr > 30, psnr


def test_tiled_matches_untiled_on_demo_data_with_default_weights(tmp_path):
    """Issue criterion: on the demo data with the default weights, tiled output >= 50 dB against untiled."""
    from xvr_batch import synth
    from xvr_batch.demo import DEMO_HR_SHAPE, DEMO_STRIDE
    arc = tmp_path / "demo.h5"
    synth.synthesize(str(arc), n_frames=24, hr_shape=DEMO_HR_SHAPE, stride=DEMO_STRIDE, seed=1234)
    full = read_data(reconstruct(Options(archive=str(arc), output=str(tmp_path / "f.h5")), progress=False))
    tiled = read_data(reconstruct(Options(archive=str(arc), output=str(tmp_path / "t.h5"), tile=24), progress=False))
    rng = full.max() - full.min()
    psnr = 10 * np.log10(rng ** 2 / np.mean((full.astype(np.float64) - tiled) ** 2))
    assert psnr >= 50, psnr
