"""``--config FILE.toml``: keys mirror the long flags, values are type-checked strictly, flags win, and
every problem in the file is one line (exit 2) naming the file and the key."""

from __future__ import annotations

import pytest

from conftest import sha256
from xvr_batch.cli import main
from xvr_batch.config import MAX_CONFIG_BYTES
from xvr_batch.synth import synthesize


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "a.h5"
    synthesize(path, n_frames=30, hr_shape=(64, 64), stride=10, seed=0)
    return path


def _run(capsys, *argv) -> str:
    main([str(a) for a in argv])
    return capsys.readouterr().out


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _write(tmp_path, text: str | bytes, name: str = "c.toml"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _units(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("units:"))


# ---------------------------------------------------------------------------------------- refused

BAD = {
    "float for int": ("unit-frames = 8.7", "key 'unit-frames' = 8.7: expected an integer (--unit-frames)"),
    "bool for int": ("unit-frames = true", "key 'unit-frames' = true: expected an integer"),
    "string for int": ('unit-frames = "8"', "expected an integer"),
    "list for int": ("unit-frames = [8]", "key 'unit-frames' = [8]: expected an integer"),
    "table for int": ("unit-frames = {a = 1}", "expected an integer"),
    "out of range": ("unit-frames = 0", "0 is not in the range x>=1 (--unit-frames)"),
    "int for string": ("weights = 3", "key 'weights' = 3: expected a string (--weights)"),
    "date for string": ("weights = 2024-01-01", "expected a string"),
    "unknown top-level key": ("unit-framez = 5", "unknown key 'unit-framez': it is no flag of any command"),
    "unknown table": ("[plann]\nunit-frames = 5", "unknown table [plann]"),
    "unknown key in table": ("[plan]\nunit-framez = 5", "unknown key 'unit-framez' in [plan]"),
    "other command's flag in table": ("[plan]\ntime = '01:00:00'", "unknown key 'time' in [plan]"),
    "python name, not flag": ("[reconstruct]\nwalltime = '01:00:00'", "unknown key 'walltime' in [reconstruct]"),
    "python name of -o": ("[plan]\nplan_out = 'p.json'", "unknown key 'plan_out' in [plan]"),
    "nested table": ("[plan.extra]\nx = 1", "unknown key 'extra' in [plan]"),
    "bad type in other table": ("[reconstruct]\nunit-frames = 2.5", "key 'unit-frames' in [reconstruct] = 2.5"),
    "choice": ("[reconstruct]\nprecision = 'fp64'", "'fp64' is not one of"),
    "choice not string": ("[reconstruct]\ndtype = 16", "expected one of 'float32', 'uint16'"),
    "flag not bool": ("[reconstruct]\noverwrite = 1", "key 'overwrite' in [reconstruct] = 1: expected true or false"),
    "multiple needs list": ("[reconstruct]\nsbatch = '--qos=high'", "expected a list whose items are each a string"),
    "multiple of wrong type": ("[reconstruct]\nsbatch = [1, 2]", "expected a list whose items are each a string"),
    "nargs 2 too short": ("[synth]\nhr-size = [64]", "expected a list of 2 items, each an integer (--hr-size)"),
    "nargs 2 floats": ("[synth]\nhr-size = [64.0, 64.0]", "expected a list of 2 items"),
    "nan float": ("[train]\nlr = nan", "key 'lr' in [train] = nan: expected a finite number"),
    "float out of range": ("[train]\np-motion = 2", "not in the range 0<=x<=1"),
    "same flag twice": ("unit-frames = 5\nunit_frames = 6", "name the same flag --unit-frames"),
    "config key": ('config = "other.toml"', "key 'config' cannot be set in a config file"),
    "debug key": ("debug = true", "key 'debug' cannot be set in a config file"),
    "array of tables": ("[[plan]]\nunit-frames = 5", "unknown key 'plan'"),
    "deep nesting": ("x = " + "[" * 3000 + "]" * 3000, "nested too deeply"),
    "deep inline tables": ("x = " + "{a = " * 3000 + "1" + "}" * 3000, "nested too deeply"),
    "not toml": ("unit-frames = = 5", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, small_archive, capsys, case):
    text, needle = BAD[case]
    cfg = _write(tmp_path, text)
    before = sha256(small_archive)
    err = _error(capsys, "plan", "--config", cfg, small_archive)
    assert str(cfg) in err and needle in err, err
    assert sha256(small_archive) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]  # nothing written


def test_non_utf8_config_is_refused(tmp_path, small_archive, capsys):
    cfg = _write(tmp_path, b"unit-frames = 5 # caf\xe9\n")
    err = _error(capsys, "plan", "--config", cfg, small_archive)
    assert str(cfg) in err and "not UTF-8" in err


def test_config_that_is_not_a_regular_file_or_too_big_is_refused(tmp_path, small_archive, capsys):
    err = _error(capsys, "plan", "--config", tmp_path, small_archive)
    assert "not a regular file" in err
    big = _write(tmp_path, "# " + "x" * MAX_CONFIG_BYTES + "\n", "big.toml")
    err = _error(capsys, "plan", "--config", big, small_archive)
    assert "more than" in err and str(big) in err


def test_top_level_key_of_another_command_only_is_fine(tmp_path, small_archive, capsys):
    # `time` and `sbatch` are flags of reconstruct only: at the top level they do not stop `plan`
    cfg = _write(tmp_path, 'time = "01:00:00"\nsbatch = ["--qos=high"]\nunit-frames = 16\n')
    assert "units: 2" in _units(_run(capsys, "plan", "--config", cfg, small_archive))


# ---------------------------------------------------------------------------------------- accepted

def test_unit_frames_from_file_takes_effect_and_the_flag_wins(tmp_path, small_archive, capsys):
    default = _units(_run(capsys, "plan", small_archive))
    for text in ("unit-frames = 16\n", "unit_frames = 16\n", "[plan]\nunit-frames = 16\n"):
        cfg = _write(tmp_path, text)
        units = _units(_run(capsys, "plan", "--config", cfg, small_archive))
        assert units.startswith("units: 2 of up to 16 frames"), (text, units)
    assert _units(_run(capsys, "plan", "--config", cfg, small_archive, "--unit-frames", "10")).startswith("units: 3")
    assert not default.startswith("units: 2 of up to 16 frames")


def test_time_and_sbatch_mirror_the_flags_for_reconstruct(tmp_path, small_archive, capsys):
    cfg = _write(tmp_path, '[reconstruct]\ntime = "01:00:00"\nsbatch = ["--qos=high"]\npartition = "debugq"\n'
                           'cpus-per-task = 3\n')
    out = tmp_path / "o.h5"
    script = _run(capsys, "reconstruct", "--config", cfg, small_archive, "-o", out, "--nodes", "1", "--dry-run")
    assert "#SBATCH --time=01:00:00" in script and "#SBATCH --qos=high" in script
    assert "#SBATCH --partition=debugq" in script and "#SBATCH --cpus-per-task=3" in script
    script = _run(capsys, "reconstruct", "--config", cfg, small_archive, "-o", out, "--nodes", "1", "--dry-run",
                  "--time", "02:00:00")
    assert "#SBATCH --time=02:00:00" in script and "--time=01:00:00" not in script  # the flag wins
    assert not out.exists()


def test_nargs_and_float_values(tmp_path, capsys):
    cfg = _write(tmp_path, "[synth]\nhr-size = [32, 48]\nframes = 12\nstride = 4\nspeed = 1\nfamily = []\n")
    out = tmp_path / "s.h5"
    _run(capsys, "synth", "--config", cfg, out)
    import h5py
    with h5py.File(out, "r") as f:
        assert f["/exchange/data_lr"].shape == (12, 8, 12)
