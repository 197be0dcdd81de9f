"""The command line as a user meets it: one-line errors with exit code 2, config files, examples.

User errors run in-process (the ``run_cli`` fixture); real processes only where the process boundary
matters: the installed entry point's exit code, ``--debug``, the tmpfs (disk full, read-only) cases and
the example scripts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, SHARED, Result, cli, make_archive, read_data, sha256


def _mutate(path: Path, fn) -> Path:
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def _replace(name, data):
    def fn(f):
        del f[name]
        f[name] = data
    return fn


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder`` (relative name -> file content, None for a folder); {} if absent."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def assert_user_error(r: Result, expect: str, *, inputs: dict[Path, str | None], output: Path,
                      beside_before: dict[str, bytes | None], progress: tuple[str, ...] = ()) -> None:
    """Exit code 2, stderr exactly one line ``error: ...`` (containing ``expect``), no traceback, every
    input unchanged (sha256; None: it did not exist and still does not), and nothing written beside the
    output name: no output file, work directory or temp file (the folder is as it was before).

    ``progress``: the start of each progress line the run logs before it meets the error (none: stderr
    is the error line alone)."""
    assert r.code == 2, (r.code, r.out, r.err)
    assert "Traceback" not in r.err, r.err
    lines = r.err.splitlines()
    assert len(lines) == len(progress) + 1, r.err
    assert all(ln.startswith(want) for ln, want in zip(lines, progress)), r.err
    assert lines[-1].startswith("error: "), r.err
    assert expect.lower() in lines[-1].lower(), (expect, lines[-1])
    for path, before in inputs.items():
        assert (sha256(path) if path.exists() else None) == before, f"{path} was modified"
    assert _listing(output.parent) == beside_before, "something was written beside the output"


BAD_ARCHIVES = {
    "missing file": (lambda p: p.with_name("absent.h5"), "not found"),
    "not hdf5": (lambda p: (p.write_bytes(b"plain text, not HDF5" * 100), p)[1], "HDF5"),
    "truncated": (lambda p: (p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), p)[1], ""),
    "missing LR": (lambda p: _mutate(p, lambda f: f.__delitem__("/exchange/data_lr")), "--lr"),
    "missing HR": (lambda p: _mutate(p, lambda f: f.__delitem__("/exchange/data_hr")), "--hr"),
    "wrong rank": (lambda p: _mutate(p, _replace("/exchange/data_lr", np.zeros((40, 8), np.uint16))), "data_lr"),
    "empty": (lambda p: _mutate(p, _replace("/exchange/data_lr", np.zeros((0, 8, 12), np.uint16))), "data_lr"),
    "strings": (lambda p: _mutate(p, _replace("/exchange/data_lr", np.full((40, 8, 12), b"x", dtype="S1"))),
                "data_lr"),
    "HR not a multiple": (lambda p: _mutate(p, _replace("/exchange/data_hr", np.zeros((3, 30, 48), np.uint16))),
                          "multiple"),
    "different multiple per axis": (lambda p: _mutate(p, _replace("/exchange/data_hr",
                                                                   np.zeros((3, 32, 36), np.uint16))), "both axes"),
    "hr_index missing": (lambda p: _mutate(p, lambda f: f.__delitem__("/exchange/hr_index")), "--hr-stride"),
    "hr_index non-integer": (lambda p: _mutate(p, _replace("/exchange/hr_index", np.array([3.5, 11, 30]))),
                             "hr_index"),
    "hr_index not increasing": (lambda p: _mutate(p, _replace("/exchange/hr_index", np.array([3, 30, 11]))),
                                "increasing"),
    "hr_index out of range": (lambda p: _mutate(p, _replace("/exchange/hr_index", np.array([3, 11, 40]))),
                              "outside"),
    "hr_index count mismatch": (lambda p: _mutate(p, _replace("/exchange/hr_index", np.array([3, 11]))),
                                "hr_index"),
    "fewer than 2 key frames": (lambda p: _mutate(p, lambda f: (_replace("/exchange/hr_index", np.array([3]))(f),
                                                              _replace("/exchange/data_hr",
                                                                       np.zeros((1, 32, 48), np.uint16))(f))),
                                "key frame"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_input_gives_one_line_exit_2_and_no_output(tmp_path, tiny_weights, run_cli, case):
    archive = make_archive(tmp_path / "a.h5")
    make, expect = BAD_ARCHIVES[case]
    bad = make(archive)
    inputs = {bad: sha256(bad) if bad.exists() else None}
    out = tmp_path / "out" / "out.h5"
    out.parent.mkdir()
    r = run_cli("reconstruct", bad, "-o", out, "--weights", tiny_weights)
    assert_user_error(r, expect, inputs=inputs, output=out, beside_before={})


def test_nan_in_float_archive(tmp_path, tiny_weights, run_cli):
    arc = make_archive(tmp_path / "a.h5", dtype=np.float32)
    _mutate(arc, lambda f: f["/exchange/data_lr"].__setitem__((5, 2, 3), np.nan))
    out = tmp_path / "out" / "o.h5"
    out.parent.mkdir()
    r = run_cli("reconstruct", arc, "-o", out, "--weights", tiny_weights)
    assert_user_error(r, "/exchange/data_lr", inputs={arc: sha256(arc)}, output=out, beside_before={},
                      progress=("checking the archive for NaN/Inf",))
    assert "NaN" in r.err and "frame 5 " in r.err, r.err


def test_user_error_from_the_installed_entry_point(tmp_path):
    """The real process: exit status 2, one line on stderr, no traceback, nothing written."""
    script = Path(sys.executable).parent / "xvr-batch"
    assert script.exists(), f"the console script is not installed next to the interpreter ({script})"
    r = subprocess.run([str(script), "reconstruct", str(tmp_path / "absent.h5"), "-o", str(tmp_path / "o.h5")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: ") and "not found" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_debug_shows_traceback(tmp_path):
    r = cli("--debug", "reconstruct", tmp_path / "absent.h5", "-o", tmp_path / "o.h5")
    assert r.returncode == 2, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "UserError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "not found" in r.stderr


def test_output_exists_and_folder_problems(tmp_path, archive, tiny_weights, run_cli):
    inputs = {archive: sha256(archive)}
    out = tmp_path / "o.h5"
    out.write_bytes(b"precious")
    before = _listing(tmp_path)
    r = run_cli("reconstruct", archive, "-o", out, "--weights", tiny_weights)
    assert_user_error(r, "--overwrite", inputs=inputs, output=out, beside_before=before)
    assert out.read_bytes() == b"precious"
    nodir = tmp_path / "nodir" / "o.h5"
    r = run_cli("reconstruct", archive, "-o", nodir, "--weights", tiny_weights)
    assert_user_error(r, "does not exist", inputs=inputs, output=nodir, beside_before={})
    assert not nodir.parent.exists()
    r = run_cli("reconstruct", archive, "-o", archive, "--weights", tiny_weights, "--overwrite")
    assert_user_error(r, "input", inputs=inputs, output=archive, beside_before=before)


def _mount_tmpfs(path: Path, options: str) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_output_folder_not_writable(tmp_path, archive, tiny_weights):
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount_tmpfs(ro, "ro,size=64k")  # read-only: not writable even for root
    try:
        r = cli("reconstruct", archive, "-o", ro / "o.h5", "--weights", tiny_weights)
        assert r.returncode == 2 and "not writable" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        subprocess.run(["umount", str(ro)])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a small tmpfs")
def test_disk_full_is_one_line_and_resumable(tmp_path, archive, tiny_weights):
    small = tmp_path / "small"
    small.mkdir()
    _mount_tmpfs(small, "size=300k")
    try:
        r = cli("reconstruct", archive, "-o", small / "o.h5", "--weights", tiny_weights, "--unit-frames", 5,
                "--compression", "none")
        assert r.returncode == 2, r.stderr
        assert "disk full" in r.stderr and "Traceback" not in r.stderr
        assert not (small / "o.h5").exists()
        assert not list(small.glob(".o.h5.tmp-*"))
    finally:
        subprocess.run(["umount", str(small)])


def test_config_file_keys_mirror_flags_and_flags_win(tmp_path, archive, tiny_weights, run_cli):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'weights = "{tiny_weights}"\n[reconstruct]\nunit-frames = 5\ndtype = "uint16"\n')
    r = run_cli("reconstruct", archive, "-o", tmp_path / "a.h5", "--config", cfg, "-q", "--keep-workdir")
    assert r.code == 0, r.err
    assert read_data(tmp_path / "a.h5").dtype == np.uint16
    import json
    man = json.loads((tmp_path / "a.h5.xvr" / "manifest.json").read_text())
    assert man["plan"]["unit_frames"] == 5
    r = run_cli("reconstruct", archive, "-o", tmp_path / "b.h5", "--config", cfg, "--dtype", "float32", "-q")
    assert r.code == 0, r.err
    assert read_data(tmp_path / "b.h5").dtype == np.float32  # the flag wins over the file
    bad = tmp_path / "bad.toml"
    bad.write_text("[reconstruct]\nunit-framez = 5\n")
    before = _listing(tmp_path)
    r = run_cli("reconstruct", archive, "-o", tmp_path / "c.h5", "--config", bad)
    assert_user_error(r, "unknown key 'unit-framez'", inputs={archive: sha256(archive), bad: sha256(bad)},
                      output=tmp_path / "c.h5", beside_before=before)


def test_inspect_and_plan_write_nothing(tmp_path, archive, tiny_weights, run_cli):
    """Nothing is written: not beside the archive, not in the working directory, not into the archive."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before, digest = _listing(tmp_path), sha256(archive)
    mtime = archive.stat().st_mtime_ns
    r = run_cli("inspect", archive, cwd=cwd)
    assert r.code == 0, r.err
    assert "40 x 8 x 12" in r.out and "key frames" in r.out
    r = run_cli("plan", archive, "--weights", tiny_weights, "--unit-frames", 7, cwd=cwd)
    assert r.code == 0, r.err
    assert "units: 6" in r.out and "TFLOP" in r.out and "GiB" in r.out
    r = run_cli("plan", "archive.h5", "--weights", tiny_weights, cwd=tmp_path)  # a relative path, from its folder
    assert r.code == 0, r.err
    assert _listing(tmp_path) == before  # cwd/ is still empty, and nothing new beside archive.h5
    assert sha256(archive) == digest and archive.stat().st_mtime_ns == mtime


def test_convert_weights_round_trip(tmp_path, run_cli):
    fixture = SHARED / "fixtures" / "xfusion_parity_small.pt"
    if not fixture.exists():
        pytest.skip(f"reference fixture not found at {fixture} (set XVR_SHARED)")
    import yaml
    data = torch.load(fixture, weights_only=True)
    case = data["cases"][1]
    torch.save(case["checkpoint"], tmp_path / "xf.pth")
    (tmp_path / "net.yml").write_text(yaml.safe_dump({"network_g": dict(data["config"], type="PatchTransformerVSTF")}))
    r = run_cli("convert-weights", tmp_path / "xf.pth", "--network-g", tmp_path / "net.yml", "-o", tmp_path / "ours.pt")
    assert r.code == 0, r.err
    from xvr_batch.model import load_checkpoint
    model, ckpt = load_checkpoint(tmp_path / "ours.pt")
    assert ckpt["format_version"] == 1 and ckpt["config"]["head"] == "all"
    with torch.no_grad():
        assert (model(case["lq"], case["hq"]) - case["out"]).abs().max() <= 1e-4


@pytest.mark.parametrize("script", ["examples/quickstart.sh", "examples/custom_paths/run.sh"])
def test_examples_run(tmp_path, script):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["bash", str(REPO / script), str(tmp_path / "work")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_score_weights_example_scores_against_the_baselines(tmp_path):
    """examples/score_weights.py: reconstruct + evaluate per archive, margins that agree with the PSNRs."""
    import json

    from xvr_batch.synth import synthesize

    paths = []
    for seed, fam in ((11, "particles"), (12, "crack")):
        paths.append(tmp_path / f"s{seed}.h5")
        synthesize(str(paths[-1]), n_frames=41, hr_shape=(64, 64), stride=20, seed=seed, families=fam)
    out = tmp_path / "score.json"
    r = subprocess.run([sys.executable, str(REPO / "examples/score_weights.py"), "--archives", *map(str, paths),
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [row["archive"] for row in res["rows"]] == ["s11.h5", "s12.h5"]
    for row in res["rows"]:
        assert abs(row["margin_db"] - (row["swin_xvr"] - row["best_baseline"])) < 1e-9
        assert row["best_baseline"] >= max(row["key_blend"], row["lr_bicubic"]) - 1e-9
    assert abs(res["mean_margin_db"] - sum(r["margin_db"] for r in res["rows"]) / 2) < 1e-9
    assert "mean_margin_db_seen_families" not in res  # families are unknown for --archives
    assert "mean margin over all 2 archives" in r.stdout


def test_interpolate_weights_example(tmp_path, tiny_weights):
    """examples/interpolate_weights.py: (1 - alpha) * BASE + alpha * TUNED, both ends exact, provenance in meta;
    a checkpoint of another model is refused with one line and exit 2."""
    import torch

    from xvr_batch.model import SwinXVR, load_checkpoint, preset, save_checkpoint

    torch.manual_seed(5)
    tuned = tmp_path / "tuned.pt"
    save_checkpoint(tuned, SwinXVR(preset("tiny", window=4)).eval())
    script = str(REPO / "examples/interpolate_weights.py")
    sd = {}
    for alpha in ("0", "0.25", "1"):
        out = tmp_path / f"mix{alpha}.pt"
        r = subprocess.run([sys.executable, script, str(tiny_weights), str(tuned), "--alpha", alpha, "-o", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        model, ckpt = load_checkpoint(out)
        sd[alpha] = model.state_dict()
        assert ckpt["meta"]["kind"] == "interpolation" and ckpt["meta"]["alpha"] == float(alpha)
    base_sd = load_checkpoint(tiny_weights)[0].state_dict()
    tuned_sd = load_checkpoint(tuned)[0].state_dict()
    name = next(k for k, v in base_sd.items() if v.is_floating_point() and v.numel() > 1)
    assert torch.equal(sd["0"][name], base_sd[name]) and torch.equal(sd["1"][name], tuned_sd[name])
    assert torch.allclose(sd["0.25"][name], 0.75 * base_sd[name] + 0.25 * tuned_sd[name], atol=1e-6)
    torch.manual_seed(6)
    other = tmp_path / "other.pt"
    save_checkpoint(other, SwinXVR(preset("tiny", window=4, head="centre")).eval())
    r = subprocess.run([sys.executable, script, str(tiny_weights), str(other), "--alpha", "0.5", "-o",
                        str(tmp_path / "bad.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "different models" in r.stderr and not (tmp_path / "bad.pt").exists()
    r = subprocess.run([sys.executable, script, str(tmp_path / "missing.pt"), str(tuned), "--alpha", "0.5", "-o",
                        str(tmp_path / "bad.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    # TUNED added time conditioning over BASE: BASE counts as the same network with those parameters at zero
    timed = SwinXVR(preset("tiny", window=4, time_cond=True)).eval()
    with torch.no_grad():
        timed.base_gate.fill_(0.8)
        timed.time_embed.fill_(0.4)
    save_checkpoint(tmp_path / "timed.pt", timed)
    out = tmp_path / "mix_timed.pt"
    r = subprocess.run([sys.executable, script, str(tiny_weights), str(tmp_path / "timed.pt"), "--alpha", "0.25",
                        "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    mixed = load_checkpoint(out)[0]
    assert mixed.cfg.time_cond
    assert torch.allclose(mixed.base_gate, torch.tensor([0.2])) and torch.allclose(mixed.time_embed, torch.tensor(0.1))
    assert torch.allclose(mixed.state_dict()[name], 0.75 * base_sd[name] + 0.25 * timed.state_dict()[name], atol=1e-6)
