"""Untrusted weights and records: hostile checkpoints, non-regular files, tampered normalisation.

Each hostile input must end in one clear UserError (one line, exit 2 at the CLI, input untouched), before
anything large is allocated, never in a hang, a traceback or NaN output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, sha256
from xvr_batch.errors import UserError
from xvr_batch.model import SwinXVR, load_checkpoint, preset, save_checkpoint
from xvr_batch.model.checkpoint import FORMAT, MAX_CHECKPOINT_BYTES, xfusion_config
from xvr_batch.model.config import PRESETS, ModelConfig, size_caps
from xvr_batch.normalise import Normalisation, NormalisationError
from xvr_batch.weights import ResolvedWeights, resolve_weights


def _tiny() -> SwinXVR:
    torch.manual_seed(0)
    return SwinXVR(preset("tiny", window=4)).eval()


def _ckpt(model: SwinXVR | None = None, **changes) -> dict:
    model = model or _tiny()
    ckpt = {"format": FORMAT, "format_version": 1, "config": model.cfg.to_dict(),
            "params": {k: v.clone() for k, v in model.state_dict().items()}, "meta": {}}
    ckpt.update(changes)
    return ckpt


def _save(path: Path, ckpt: dict) -> Path:
    torch.save(ckpt, path)
    return path


def _refused(path: Path, *needles: str) -> str:
    before = sha256(path) if path.is_file() else None
    with pytest.raises(UserError) as err:
        resolve_weights(str(path))
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    if before is not None:
        assert sha256(path) == before  # the input is never modified
    return msg


def _cli_err(capsys, argv: list[str]) -> str:
    from xvr_batch.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", ["params", "params_ema"])
def test_non_finite_weights_are_refused_naming_the_tensor_and_file(tmp_path, bad, key):
    model = _tiny()
    ckpt = _ckpt(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = "stages.0.blocks.1.mlp.fc1.weight"
    state[name][3, 2] = bad
    ckpt[key] = state
    path = _save(tmp_path / "bad.pt", ckpt)
    _refused(path, str(path), name, "NaN/Inf", f"[{key}]")


def test_non_finite_weights_fail_reconstruct_with_exit_2_and_no_output(tmp_path, archive, capsys):
    ckpt = _ckpt()
    ckpt["params"]["conv_last.bias"][0] = math.nan
    path = _save(tmp_path / "nan.pt", ckpt)
    out = tmp_path / "out.h5"
    err = _cli_err(capsys, ["reconstruct", archive, "-o", out, "--weights", path, "-q"])
    assert "conv_last.bias" in err and str(path) in err
    assert not out.exists() and not (tmp_path / "out.h5.xvr").exists()


def test_integer_weights_are_refused(tmp_path):
    ckpt = _ckpt()
    ckpt["params"]["lr_conv.bias"] = torch.zeros_like(ckpt["params"]["lr_conv.bias"], dtype=torch.int64)
    _refused(_save(tmp_path / "int.pt", ckpt), "lr_conv.bias", "not floating point")


def test_good_checkpoint_still_loads(tmp_path):
    model = _tiny()
    path = tmp_path / "good.pt"
    save_checkpoint(path, model)
    rw = resolve_weights(str(path))
    assert rw.config == model.cfg and rw.trained
    assert ResolvedWeights.from_dict(json.loads(json.dumps(rw.to_dict()))) == rw


# ---------------------------------------------------------------------------------------- hostile configs

BAD_CONFIGS = {
    "string depth": ({"depths": ["2"]}, "depths must be a list of integers"),
    "string depths": ({"depths": "22"}, "depths must be a list of integers"),
    "nested depths": ({"depths": [[2]]}, "depths must be a list of integers"),
    "scalar depths": ({"depths": 2}, "depths must be a list of integers"),
    "negative depth": ({"depths": [-2]}, "depths must be >= 1"),
    "zero depth": ({"depths": [0]}, "depths must be >= 1"),
    "float embed_dim": ({"embed_dim": 24.0}, "embed_dim must be an integer"),
    "bool embed_dim": ({"embed_dim": True}, "embed_dim must be an integer"),
    "negative embed_dim": ({"embed_dim": -24}, "embed_dim must be in"),
    "string window": ({"window": "4"}, "window must be an integer"),
    "huge window": ({"window": 1000}, "window must be in"),
    "huge window_t": ({"window_t": 100}, "window_t must be in"),
    "float window_t": ({"window_t": 2.5}, "window_t must be an integer or null"),
    "too many window tokens": ({"window": 64, "window_t": 5}, "tokens"),
    "heads do not divide": ({"num_heads": [5]}, "not divisible by num_heads 5"),
    "zero heads": ({"num_heads": [0]}, "not divisible by num_heads 0"),
    "mismatched stages": ({"num_heads": [3, 3]}, "same, non-zero length"),
    "no stages": ({"depths": [], "num_heads": []}, "same, non-zero length"),
    "unknown head": ({"head": "middle"}, "head must be one of"),
    "list head": ({"head": ["all"]}, "head must be a string"),
    "unknown residual": ({"residual": "add"}, "residual must be one of"),
    "string qkv_bias": ({"qkv_bias": "yes"}, "qkv_bias must be true or false"),
    "int qkv_bias": ({"qkv_bias": 1}, "qkv_bias must be true or false"),
    "nan mlp_ratio": ({"mlp_ratio": math.nan}, "mlp_ratio must be finite"),
    "string mlp_ratio": ({"mlp_ratio": "2"}, "mlp_ratio must be a number"),
    "zero mlp_ratio": ({"mlp_ratio": 0.0}, "mlp_ratio must be in"),
    "huge mlp_ratio": ({"mlp_ratio": 1e6}, "mlp_ratio must be in"),
    "nan drop_path": ({"drop_path": math.nan}, "drop_path must be finite"),
    "drop_path 1": ({"drop_path": 1.0}, "drop_path must be in [0, 1)"),
    "scale 8": ({"scale": 8}, "scale must be 4"),
    "in_ch 3": ({"in_ch": 3}, "in_ch must be 1"),
    "num_lr 0": ({"num_lr": 0}, "num_lr must be in"),
    "num_lr huge": ({"num_lr": 10**6}, "num_lr must be in"),
    "unknown key": ({"dropout": 0.1}, "unknown model config keys ['dropout']"),
    "too many parameters": ({"embed_dim": 3072, "num_heads": [3], "depths": [12]}, "M parameters is above the cap"),
    "too much work": ({"embed_dim": 768, "num_heads": [3], "depths": [40], "num_lr": 60, "recon_dim": 512},
                      "GFLOP per LR pixel is above the cap"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_hostile_config_is_refused_in_one_line(tmp_path, case):
    changes, needle = BAD_CONFIGS[case]
    ckpt = _ckpt()
    ckpt["config"] = dict(ckpt["config"], **changes)
    path = _save(tmp_path / "bad.pt", ckpt)
    msg = _refused(path, needle, str(path))
    assert "invalid model config" in msg or "unknown model config" in msg


def test_config_that_is_not_a_dict_is_refused(tmp_path):
    _refused(_save(tmp_path / "a.pt", _ckpt(config=[1, 2])), "no model config")
    _refused(_save(tmp_path / "b.pt", _ckpt(format_version="1")), "format version")
    _refused(_save(tmp_path / "c.pt", _ckpt(params=[torch.zeros(1)])), "not a state dict of tensors")


def test_size_caps_are_ten_times_the_largest_preset_and_computed_without_building():
    max_params, max_flops = size_caps()
    assert max_params == 10 * PRESETS["paper"].parameter_count()
    assert 9e7 < max_params < 1.1e8  # the paper's model has 10.0 M parameters
    for name, cfg in PRESETS.items():  # the count from the config is the built model's
        assert cfg.parameter_count() == sum(p.numel() for p in SwinXVR(cfg).parameters()), name
        assert cfg.flops_per_lr_pixel() <= max_flops / 10
    for cfg in (preset("tiny", window=4, window_t=5, head="centre", qkv_bias=False),
                preset("lite", num_lr=5, mlp_ratio=3.0)):
        assert cfg.parameter_count() == sum(p.numel() for p in SwinXVR(cfg).parameters())
        # the estimate is SwinXVR.flops without padding: exact where the frame tiles into windows
        w = cfg.window * 8
        assert cfg.flops_per_lr_pixel() == pytest.approx(SwinXVR(cfg).flops(w, w) / w**2, rel=1e-9)


_MEMORY_CHILD = r"""
import json, resource, sys, time
from xvr_batch.errors import UserError
from xvr_batch.weights import resolve_weights
import torch
torch.zeros(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    resolve_weights(sys.argv[1])
    msg = None
except UserError as exc:
    msg = str(exc)
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"msg": msg, "seconds": seconds, "grew_kb": after - before}))
"""


def _limit_memory() -> None:  # a regression must fail the test, not take the machine down
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def _resolve_in_child(path: Path) -> dict:
    """``resolve_weights(path)`` in a fresh process: its message, seconds and growth of peak RSS (KB)."""
    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(path)], capture_output=True, text=True,
                       cwd=REPO, timeout=100, preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
def test_huge_depth_is_refused_before_any_allocation(tmp_path):
    """depths=[100000] in a 2 KB file used to build a 12 GB model."""
    ckpt = _ckpt(params={"lr_conv.bias": torch.zeros(24)})
    ckpt["config"]["depths"] = [100000]
    path = _save(tmp_path / "deep.pt", ckpt)
    assert path.stat().st_size < 4096
    res = _resolve_in_child(path)
    assert res["msg"] and "M parameters is above the cap" in res["msg"] and "(10x the largest preset)" in res["msg"]
    assert res["seconds"] < 5
    assert res["grew_kb"] < 200 * 1024


def test_huge_depth_in_xfusion_network_g_is_refused():
    with pytest.raises(UserError, match="network_g: invalid model config: .* M parameters is above the cap"):
        xfusion_config({"embed_dim": 24, "num_feat_ext": 24, "depths": [100000], "num_heads": [3],
                        "window_size": [3, 4, 4], "num_frame": 3})
    with pytest.raises(UserError, match="depths must be a list of integers"):
        xfusion_config({"depths": "6,6", "num_heads": [1, 1]})
    with pytest.raises(UserError, match="embed_dim must be an integer"):
        xfusion_config({"embed_dim": "96", "num_feat_ext": "96"})


def test_shape_mismatch_is_one_line(tmp_path):
    ckpt = _ckpt()
    ckpt["config"]["recon_dim"] = 8
    msg = _refused(_save(tmp_path / "shape.pt", ckpt), "wrong shapes", "head_conv.weight")
    assert "check that the weights match the config" in msg


@pytest.mark.timeout(120)
def test_compressed_zip_record_is_refused_before_it_is_inflated(tmp_path):
    """A 400 KB file whose deflated record inflates to 400 MB made torch.load allocate it all."""
    plain = _save(tmp_path / "plain.pt", _ckpt())
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data/0"):
                out.writestr(info, bytes(400 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, data)
    assert bomb.stat().st_size < 2 << 20
    _refused(bomb, "compressed records", str(bomb))
    res = _resolve_in_child(bomb)  # in a fresh process, so that the peak memory means something
    assert res["msg"] and "compressed records" in res["msg"]
    assert res["grew_kb"] < 200 * 1024


def test_pickled_objects_are_still_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": Path("/etc/passwd")}, path)
    _refused(path, "refused", "arbitrary pickled objects")


# ---------------------------------------------------------------------------------------- not a regular file

@pytest.mark.timeout(30)
def test_fifo_as_weights_is_refused_without_hanging(tmp_path, archive, capsys):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    _refused(fifo, "named pipe", str(fifo))
    err = _cli_err(capsys, ["plan", archive, "--weights", fifo])
    assert "named pipe" in err


@pytest.mark.timeout(30)
def test_device_and_directory_as_weights_are_refused(tmp_path):
    _refused(Path("/dev/zero"), "character device")
    _refused(tmp_path, "directory")
    _refused(tmp_path / "absent.pt", "not found")


def test_absurdly_large_file_is_refused_with_its_size(tmp_path):
    path = tmp_path / "huge.pt"
    with open(path, "wb") as f:  # sparse: no disk space used
        f.truncate(MAX_CHECKPOINT_BYTES + 2**30)
    before = path.stat()
    with pytest.raises(UserError) as err:  # not _refused(): hashing 5 GiB of holes twice takes half a minute
        resolve_weights(str(path))
    msg = str(err.value)
    assert "\n" not in msg and "5.00 GiB" in msg and "more than the 4 GiB" in msg, msg
    assert "not a readable" not in msg
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_blocks) == (before.st_size, before.st_mtime_ns, before.st_blocks)


def test_symlink_to_a_good_checkpoint_is_fine(tmp_path):
    target = tmp_path / "good.pt"
    save_checkpoint(target, _tiny())
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    model, _ = load_checkpoint(link)
    assert model.cfg == _tiny().cfg


# ---------------------------------------------------------------------------------------- tampered manifest

GOOD_NORM = dict(a=1.5, b=0.1, lo=0.0, hi=2.0, lr_flat_field=True, hr_flat_field=False, n_fit_keys=3)

BAD_NORMS = {
    "nan": (dict(lo=math.nan), "field 'lo' is nan"),
    "inf": (dict(a=math.inf), "field 'a' is inf"),
    "zero span": (dict(hi=0.0), "span hi - lo is 0"),
    "negative span": (dict(hi=-1.0), "span hi - lo is -1"),
    "string": (dict(b="0.1"), "field 'b' is str"),
    "bool": (dict(a=True), "field 'a' is bool"),
    "list": (dict(hi=[2.0]), "field 'hi' is list"),
    "flag int": (dict(hr_flat_field=0), "field 'hr_flat_field' is int"),
    "n_fit_keys float": (dict(n_fit_keys=3.0), "n_fit_keys"),
    "unknown": (dict(gain=1.0), "unknown field 'gain'"),
    "overflow": (dict(lo=0.0, hi=1e-300), "overflow float32"),
    "huge int": (dict(hi=10**400), "field 'hi' is"),
}


@pytest.mark.parametrize("case", sorted(BAD_NORMS))
def test_bad_normalisation_record_is_refused(case):
    changes, needle = BAD_NORMS[case]
    with pytest.raises(NormalisationError) as err:
        Normalisation.from_dict(dict(GOOD_NORM, **changes))
    msg = str(err.value)
    assert needle in msg and msg.startswith("work directory manifest: ") and "--force-replan" in msg
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_missing_normalisation_field_is_refused():
    d = dict(GOOD_NORM)
    del d["hi"]
    with pytest.raises(UserError, match="normalisation field 'hi' is missing"):
        Normalisation.from_dict(d)
    with pytest.raises(UserError, match="not a mapping"):
        Normalisation.from_dict([1, 2])  # type: ignore[arg-type]
    assert Normalisation.from_dict(GOOD_NORM) == Normalisation(**GOOD_NORM)


def _tamper_normalisation(node, key: str, value) -> int:
    """Set ``key`` in every ``normalisation`` record of a manifest (wherever its layout keeps them)."""
    n = 0
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "normalisation" and isinstance(v, dict):
                v[key] = value
                n += 1
            else:
                n += _tamper_normalisation(v, key, value)
    return n


@pytest.mark.timeout(300)
def test_tampered_manifest_normalisation_stops_a_resume(tmp_path, archive, tiny_weights, capsys):
    from xvr_batch.pipeline import Options, prepare
    out = tmp_path / "out.h5"
    prepare(Options(archive=str(archive), output=str(out), weights=str(tiny_weights), unit_frames=20,
                    device="cpu"))  # plans the work directory, as the first run of the command below does
    manifest = tmp_path / "out.h5.xvr" / "manifest.json"
    man = json.loads(manifest.read_text())
    assert _tamper_normalisation(man, "lo", math.nan)
    manifest.write_text(json.dumps(man))
    before = sha256(archive)
    err = _cli_err(capsys, ["reconstruct", archive, "-o", out, "--weights", tiny_weights, "-q", "--unit-frames",
                            "20", "--device", "cpu"])
    assert "normalisation field 'lo' is nan" in err and "--force-replan" in err
    assert not out.exists() and sha256(archive) == before


def test_tampered_weights_record_is_refused():
    rw = ResolvedWeights("x.pt", "0" * 64, preset("tiny"), True).to_dict()
    with pytest.raises(UserError, match="field 'trained' is str"):
        ResolvedWeights.from_dict(dict(rw, trained="yes"))
    with pytest.raises(UserError, match="field 'config' is missing"):
        ResolvedWeights.from_dict({k: v for k, v in rw.items() if k != "config"})
    with pytest.raises(UserError, match="weights record: invalid model config: .*above the cap"):
        ResolvedWeights.from_dict(dict(rw, config=dict(rw["config"], depths=[100000])))
    assert ModelConfig.from_dict(rw["config"]) == preset("tiny")
