"""``xvr-batch``: the command line. Thin: every command parses options and calls the library.

Errors a user can cause print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
import warnings
from dataclasses import fields
from pathlib import Path

import click

from xvr_batch import __version__
from xvr_batch.config import ConfigCommand
from xvr_batch.errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def _config_option(f):
    return click.option("--config", type=click.Path(dir_okay=False), default=None, is_eager=True, expose_value=False,
                        help="TOML file whose keys mirror these flags (e.g. unit-frames = 64); flags win.")(f)


def _debug_option(f):
    return click.option("--debug", is_flag=True, expose_value=False, help="Show the full traceback on errors.")(f)


def command(name: str, **kw):
    """A subcommand with --config and --debug."""
    def deco(f):
        f = _debug_option(_config_option(f))
        return main_group.command(name, cls=ConfigCommand, context_settings=CONTEXT, **kw)(f)
    return deco


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="xvr-batch")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def main_group(debug: bool) -> None:
    """Batch SWIN-XVR reconstruction of high-speed x-ray archives.

    \b
    Typical use:
      xvr-batch inspect run042.h5                 # what is in the archive, and problems
      xvr-batch plan run042.h5                    # units, halo, memory and work estimate
      xvr-batch reconstruct run042.h5 -o out.h5   # run (re-run the same command to resume)
      xvr-batch status out.h5.xvr                 # progress of a running or stopped job
    """


# ---------------------------------------------------------------------------------------- shared options

def archive_options(f):
    opts = [
        click.option("--lr", "lr", metavar="PATH", default=None, help="Dataset of LR frames [/exchange/data_lr]."),
        click.option("--hr", "hr", metavar="PATH", default=None, help="Dataset of HR key frames [/exchange/data_hr]."),
        click.option("--hr-index", "hr_index", metavar="PATH", default=None,
                     help="Dataset of key-frame LR time indices [/exchange/hr_index]."),
        click.option("--hr-stride", type=int, default=None, metavar="S",
                     help="Key frames every S LR frames (instead of an hr_index dataset)."),
        click.option("--hr-offset", type=int, default=0, show_default=True, metavar="O",
                     help="LR index of the first key frame, with --hr-stride."),
        click.option("--wait-for-writer", "wait_for_writer", type=click.FloatRange(min=0), default=None,
                     metavar="SECONDS",
                     help="If another process is still writing the archive, wait up to SECONDS for it to "
                          "finish [refuse at once]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def run_options(f):
    opts = [
        click.option("--weights", default=None, metavar="W",
                     help="Checkpoint (our format; see convert-weights) or a shipped name. Default: shipped 'lite'."),
        click.option("--unit-frames", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Output frames per work unit (the unit of resume and of distribution)."),
        click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Windows per model call."),
        click.option("--tile", type=click.IntRange(min=2), default=None,
                     help="Run the model on LR tiles of this size (for frames too large for memory)."),
        click.option("--tile-overlap", type=click.IntRange(min=1), default=None,
                     help="Tile overlap in LR pixels [2 windows]; at least one window."),
        click.option("--registration", default="auto", show_default=True, metavar="auto|none|FILE.json",
                     help="LR->HR view registration: auto = the archive's /exchange/registration, else one fitted "
                          "on the key frames (from the identity, clipped and defective readings left out) and applied "
                          "only if it moves the LR field by more than 0.25 px, lowers the residual by 10 % and exceeds "
                          "the scatter of the key pairs fitted alone; none; or a JSON file (docs/TWO_CAMERAS.md)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _options_from(kwargs: dict):
    from xvr_batch.pipeline import Options
    names = {f.name for f in fields(Options)}
    return Options(**{k: v for k, v in kwargs.items() if k in names})


# ---------------------------------------------------------------------------------------- inspect

@command("inspect")
@click.argument("archive", type=click.Path())
@archive_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(archive, lr, hr, hr_index, hr_stride, hr_offset, wait_for_writer, as_json):
    """What ARCHIVE holds (datasets, shapes, dtypes, key-frame spacing, darks/flats) and any problems."""
    from xvr_batch.io.archive import ArchivePaths, inspect_file
    base = ArchivePaths()
    paths = ArchivePaths(lr=lr or base.lr, hr=hr or base.hr, hr_index=hr_index or base.hr_index)
    info = inspect_file(archive, paths=paths, hr_stride=hr_stride, hr_offset=hr_offset,
                        wait_for_writer=wait_for_writer)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"{info['file']}  ({info.get('size_bytes', 0) / 1e6:.1f} MB)")
    click.echo(f"  LR frames   {info['n_frames']} x {info['lr_shape'][0]} x {info['lr_shape'][1]}  {info['lr_dtype']}")
    click.echo(f"  HR frames   {info['n_key_frames']} x {info['hr_shape'][0]} x {info['hr_shape'][1]}  {info['hr_dtype']}"
               f"  (scale x{info['scale']})")
    kf = info.get("key_frames", {})
    click.echo(f"  key frames  from {info['hr_index_source']}: gaps min/median/max "
               f"{kf.get('gap_min')}/{kf.get('gap_median')}/{kf.get('gap_max')}, "
               f"{kf.get('frames_before_first', 0)} frames before the first, "
               f"{kf.get('frames_after_last', 0)} after the last")
    cal = info.get("calibrations", {})
    click.echo("  darks/flats " + ", ".join(f"{k}: {'yes (%d)' % v['n_frames'] if v else 'no'}" for k, v in cal.items()))
    click.echo(f"  truth       {'data_gt present' if info.get('has_gt') else 'none'}")
    reg = info.get("registration")
    if reg:
        from xvr_batch.registration import Registration
        r = Registration(reg["matrix"], reg["lr_shape"], reg["grid_shape"], stats=reg.get("stats") or {})
        click.echo(f"  registration {r.summary()}")
    tim = info.get("timing")
    if tim and tim.get("max_abs_residual_s") is not None:
        click.echo(f"  clocks      key frames matched to LR frames within {tim['max_abs_residual_s']:.3g} s "
                   f"(rms {tim['rms_residual_s']:.3g} s; reference: {tim.get('reference_clock', 'LR camera')})")
    click.echo("  datasets:")
    for d in info.get("datasets", []):
        click.echo(f"    {d['path']:<28} {str(tuple(d['shape'])):<20} {d['dtype']:<8} "
                   f"chunks={d.get('chunks')} {d.get('compression') or ''}")
    for w in info.get("warnings", []):
        click.echo(f"  warning: {w}")
    if not info.get("warnings"):
        click.echo("  no problems found")


# ---------------------------------------------------------------------------------------- plan

@command("plan")
@click.argument("archive", type=click.Path())
@archive_options
@run_options
@click.option("-o", "--output", "plan_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the plan as JSON to this file (nothing is written otherwise).")
def plan_cmd(archive, plan_out, **kw):
    """Show the unit table, halo, and the estimated memory and work for ARCHIVE."""
    from xvr_batch.planinfo import describe_plan, format_plan
    info = describe_plan(archive, **kw)
    click.echo(format_plan(info))
    if plan_out:
        Path(plan_out).write_text(json.dumps(info, indent=2, default=str))
        click.echo(f"plan written to {plan_out}")


# ---------------------------------------------------------------------------------------- reconstruct

from xvr_batch.backends import BACKENDS, backend_options  # noqa: E402  (the backend flags of reconstruct)


@command("reconstruct")
@click.argument("archive", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output HDF5 file.")
@archive_options
@run_options
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Work directory for manifest and parts [OUTPUT.xvr].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "tf32", "bf16"]), default="auto", show_default=True,
              help="Arithmetic: auto is bf16 on CUDA and fp32 on CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch [torch default].")
@click.option("--dtype", type=click.Choice(["float32", "uint16"]), default="float32", show_default=True,
              help="Output dtype, in HR camera counts.")
@click.option("--compression", type=click.Choice(["bitshuffle", "blosc-lz4", "zstd", "lz4", "blosc-zstd", "gzip",
                                                 "none"]), default="bitshuffle", show_default=True,
              help="Output codec, also of the parts (through hdf5plugin; recorded in the file). bitshuffle "
                   "(lz4) was the fastest and compressed best of the fast ones (benchmarks/RESULTS.md).")
@click.option("--layout", type=click.Choice(["single", "virtual"]), default="single", show_default=True,
              help="single: stitch the parts into one self-contained file (one read and write of every byte). "
                   "virtual: move the parts to OUTPUT.parts/ and write OUTPUT as an HDF5 virtual dataset over them "
                   "(seconds, metadata only); keep the folder beside the file, and run `xvr-batch compact` "
                   "later for the single file.")
@click.option("--compile/--no-compile", "compile", default=False, show_default=True,
              help="torch.compile the model: one graph, Inductor default mode, deterministic (no autotuning); "
                   "the first batch of each shape compiles (about a minute).")
@click.option("--attention", type=click.Choice(["sdpa", "flex"]), default="sdpa", show_default=True,
              help="Window attention kernel: sdpa, or flex (FlexAttention; fast with --compile).")
@click.option("--refine", type=click.Choice(["lr", "none"]), default="lr", show_default=True,
              help="lr: take the key frames, moved to match the LR frame, where something moved beyond the network's "
                   "reach; put back into each frame the part of its LR residual that stands above the noise (what the "
                   "network missed, e.g. an object between key frames); and scale it by the beam's intensity change "
                   "since its key frames (a flickering beam). none: the network's output as it is.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--force-replan", is_flag=True, help="Discard an incompatible earlier work directory and start over.")
@click.option("--keep-workdir", is_flag=True, help="Keep the work directory (manifest, parts) after success.")
@backend_options
@click.option("--launcher", type=click.Choice(["torch", "mpi"]), default="torch", show_default=True,
              help="Slurm (--nodes): torch = torchrun on one node / srun across nodes; mpi = srun --mpi=pmi2.")
@click.option("--partition", default=None, help="Slurm (--nodes): partition.")
@click.option("--account", default=None, help="Slurm (--nodes): account to charge.")
@click.option("--time", "walltime", default=None, metavar="HH:MM:SS", help="Slurm (--nodes): time limit.")
@click.option("--job-name", default=None,
              help="Slurm (--nodes): job name [xvr-ARCHIVE, with characters Slurm dislikes replaced by _].")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None, help="Slurm (--nodes): CPUs per task.")
@click.option("--mem", default=None, help="Slurm (--nodes): memory per node, e.g. 64G.")
@click.option("--sbatch", "sbatch_extra", multiple=True, metavar="DIRECTIVE",
              help="Slurm (--nodes): extra #SBATCH directive, e.g. --sbatch=--qos=high (repeatable).")
@click.option("--dry-run", is_flag=True, help="Slurm (--nodes): print the job script instead of submitting it.")
@click.option("--wait", is_flag=True, help="Slurm (--nodes): follow the job to its end with a progress bar.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def reconstruct_cmd(archive, output, backend, quiet, launcher, partition, account, walltime, job_name, cpus_per_task,
                    mem, sbatch_extra, dry_run, wait, **kw):
    """Reconstruct every LR time step of ARCHIVE at HR into OUTPUT.

    Re-running the same command resumes: finished units are verified by checksum and skipped.
    Under torchrun, srun or mpiexec (--backend torch or mpi) every rank runs this same command.
    With --nodes N (and a backend other than dask-slurm) it submits itself as a Slurm job instead.

    Exit status: 0 done; 2 a problem you can fix (one line on stderr); 75 stopped cleanly on request
    (SIGUSR2/SIGTERM), resumable with the same command.
    """
    from xvr_batch.backends import backend_kwargs, get_backend
    from xvr_batch.driver import run
    opts = _options_from(dict(kw, archive=archive, output=output))
    config = dict(kw, archive=archive, output=output, backend=backend)
    slurm_flags = {"--partition": partition, "--account": account, "--time": walltime, "--job-name": job_name,
                   "--mem": mem,
                   "--cpus-per-task": cpus_per_task, "--sbatch": sbatch_extra or None, "--dry-run": dry_run or None,
                   "--wait": wait or None}
    if kw.get("nodes") is not None and backend != "dask-slurm":
        _submit(opts, kw, launcher, partition, account, walltime, job_name, cpus_per_task, mem, sbatch_extra,
                dry_run, wait, quiet)
        return
    given = [flag for flag, value in slurm_flags.items() if value is not None]
    if given:
        raise UserError(f"{given[0]} only applies with --nodes N (Slurm submission)")
    engine = get_backend(backend, **backend_kwargs(backend, kw, log=_echo_err))
    _finish_run(run(opts, engine, command=sys.argv, config=config, progress=not quiet, log=_echo_err))


def _finish_run(out: str | None) -> None:
    """Print the output path, or exit with EXIT_STOPPED (75) after a clean stop on request."""
    if out is None:
        from xvr_batch.errors import EXIT_STOPPED
        from xvr_batch.slurm.stopmark import record_stopped
        record_stopped()  # for job scripts whose launcher does not pass 75 on (torchrun, srun)
        sys.exit(EXIT_STOPPED)
    click.echo(out)


def _submit(opts, kw, launcher, partition, account, walltime, job_name, cpus_per_task, mem, sbatch_extra, dry_run,
            wait, quiet) -> None:
    from xvr_batch.slurm.client import follow_job
    from xvr_batch.slurm.submit import SubmitOptions, slurm_log, submit_reconstruct
    if kw.get("workers") or kw.get("scheduler") or kw.get("gpus_per_worker") is not None:
        raise UserError("--workers/--scheduler/--gpus-per-worker are dask options; with --nodes use "
                        "--backend dask-slurm, or drop them")
    sub = SubmitOptions(nodes=kw["nodes"], gpus_per_node=kw.get("gpus_per_node") or 0, partition=partition,
                        account=account, time=walltime, launcher=launcher, cpus_per_task=cpus_per_task, mem=mem,
                        extra_directives=list(sbatch_extra), job_name=job_name)
    job_id = submit_reconstruct(opts, sub, dry_run=dry_run, echo=click.echo)
    if job_id is None or not wait:
        return
    wd = opts.resolved_workdir().resolve()
    out = Path(opts.output).resolve()
    state = follow_job(job_id, wd, out, progress=not quiet)
    if out.exists():
        click.echo(str(out))
        return
    log = Path(slurm_log(out, job_id))
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise UserError(f"Slurm job {job_id} ended as {state} without writing {out}; see {log}"
                    + (f" (last line: {tail[0][:200]})" if tail else "")
                    + f"; re-run the same command to resume from {wd}")


# ---------------------------------------------------------------------------------------- status / resume

@command("status")
@click.argument("workdir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verify", is_flag=True, help="Also verify every part's checksum (slower).")
def status_cmd(workdir, as_json, verify):
    """Units done, pending and failed in WORKDIR (works while a job runs, from any node)."""
    from xvr_batch.workdir import WorkDir
    wd = WorkDir(workdir)
    if not wd.exists():
        raise UserError(f"{workdir}: no manifest.json here; give the work directory (default OUTPUT.xvr)")
    st = wd.status(verify=verify)
    if st["failed"]:
        journal = wd.read_journal()
        st["errors"] = {u: journal.get(u, {}).get("error", "") for u in st["failed"]}
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    n = st["n_units"]
    click.echo(f"{wd.path}: {len(st['done'])}/{n} units done, {len(st['pending'])} pending, "
               f"{len(st['failed'])} failed; {st['frames_done']}/{st['n_frames']} frames")
    if st.get("consistency"):
        from xvr_batch.consistency import describe
        click.echo(f"  LR consistency of {st['consistency']['n']} frames: "
                   f"{describe(st['consistency'], median_label='median of unit medians')}")
    for uid, why in list(st.get("errors", {}).items())[:5]:
        click.echo(f"  unit {uid} failed: {why} (it is redone on resume)")
    if st.get("problems"):
        for uid, why in list(st["problems"].items())[:5]:
            click.echo(f"  unit {uid}: {why} (will be redone)")


@command("resume")
@click.argument("workdir", type=click.Path())
@click.option("--backend", "backend_override", type=click.Choice(BACKENDS), default=None,
              help="Run on this backend instead of the one the run was started with.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def resume_cmd(workdir, backend_override, quiet):
    """Continue the run recorded in WORKDIR: the same as re-running its reconstruct command.

    It uses the recorded options and backend (with its --workers/--scheduler/... options). A run that
    used --backend torch or mpi resumes in this process as one rank, unless this command itself is
    started under torchrun, srun or mpiexec. Exits 75 if it is stopped again on request.
    """
    from xvr_batch.backends import backend_kwargs, get_backend
    from xvr_batch.driver import run
    from xvr_batch.pipeline import Options
    from xvr_batch.workdir import WorkDir
    wd = WorkDir(workdir)
    if not wd.exists():
        raise UserError(f"{workdir}: no manifest.json here; nothing to resume")
    man = wd.read_manifest()
    saved, job = man.get("options"), man.get("job")
    if not isinstance(saved, dict) or not isinstance(job, dict):
        raise UserError(f"{wd.manifest_path}: no recorded options; re-run the original reconstruct command")
    opts = Options.from_record(saved, str(wd.manifest_path))
    opts.workdir = str(wd.path)
    opts.force_replan = False
    config = job.get("config") if isinstance(job.get("config"), dict) else {}
    backend = backend_override or config.get("backend") or "local"
    if backend not in BACKENDS:
        raise UserError(f"{wd.manifest_path}: unknown recorded backend {backend!r}; pass --backend")
    recorded = config if backend == config.get("backend") else {}
    engine = get_backend(backend, **backend_kwargs(backend, recorded, log=_echo_err))
    _echo_err(f"resuming {wd.path} on --backend {backend}")
    command = job.get("command") if isinstance(job.get("command"), list) else None
    _finish_run(run(opts, engine, command=command, config=config, progress=not quiet, log=_echo_err))


# ---------------------------------------------------------------------------------------- compact

@command("compact")
@click.argument("recon", type=click.Path())
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the single file here and leave RECON and its parts as they are "
                   "[replace RECON in place, then remove its parts folder].")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def compact_cmd(recon, output, overwrite, quiet):
    """Turn RECON, written by `reconstruct --layout virtual` (a virtual dataset over RECON.parts/), into one
    self-contained file: the stored chunks are copied without decoding, at about disk speed, and every part is
    checked against the sha256 recorded in RECON. The result has the same bytes as `reconstruct` with the
    default --layout single writes for that run.

    \b
    xvr-batch compact run042_hr.h5                    # in place; removes run042_hr.h5.parts
    xvr-batch compact run042_hr.h5 -o final.h5        # keeps run042_hr.h5 and its parts

    A file that is not a virtual output, or a missing or corrupt part, is refused (exit 2); nothing is
    written under the final name until the copy is complete.
    """
    from xvr_batch.io.vds import compact
    click.echo(str(compact(recon, output, progress=not quiet, overwrite=overwrite)))


# ---------------------------------------------------------------------------------------- synth

@command("synth")
@click.argument("output", type=click.Path())
@click.option("--frames", "n_frames", type=click.IntRange(min=2), default=200, show_default=True, help="LR time steps N.")
@click.option("--hr-size", nargs=2, type=click.IntRange(min=8), default=(256, 256), show_default=True,
              help="HR frame height and width (multiples of the scale).")
@click.option("--stride", type=click.IntRange(min=1), default=20, show_default=True, help="Key frame every S steps.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Time of the first key frame.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (fully deterministic).")
@click.option("--family", "families", multiple=True, help="Scene family (repeatable); default: random mix.")
@click.option("--speed", type=float, default=None, help="Motion speed in LR pixels per frame [random].")
@click.option("--dtype", type=click.Choice(["uint16", "uint8", "float32"]), default="uint16", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--two-cameras", is_flag=True,
              help="OUTPUT is a folder: two cameras' files (LR HDF5, HR TIFF + timestamps), misregistered, two "
                   "clocks, plus truth.h5 and truth.json (see docs/TWO_CAMERAS.md).")
@click.option("--effects", default=None, metavar="LIST",
              help="Opt-in domain randomisation, comma-separated: texture, dose, saturation, psf, read, fpn, defects, "
                   "flicker, misreg; or all / random, and -NAME to drop one (e.g. all,-flicker).")
@click.option("--randomise", "--randomize", "randomise", is_flag=True,
              help="Enable a random subset of the effects (by seed); same as --effects random.")
def synth_cmd(output, n_frames, hr_size, stride, offset, seed, families, speed, dtype, overwrite, two_cameras,
              effects, randomise):
    """Write a realistic synthetic x-ray archive (with dense truth /exchange/data_gt) to OUTPUT."""
    from xvr_batch import synth
    fx = ",".join(x for x in (effects, "random" if randomise else None) if x) or None
    if fx is not None:
        try:
            synth.resolve_effects(fx, seed)
        except ValueError as exc:
            raise UserError(f"--effects: {exc}") from None
    if two_cameras:
        if fx is not None:
            raise UserError("--effects/--randomise: not available with --two-cameras")
        _synth_two_cameras(output, n_frames, hr_size, stride, offset, seed, families, speed, dtype, overwrite)
        return
    if Path(output).is_dir():
        raise UserError(f"{output}: is a directory; give a file name (or pass --two-cameras to write a folder)")
    if Path(output).exists() and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite or choose another name")
    bad = [f for f in families if f not in synth.ALL_FAMILIES]
    if bad:
        raise UserError(f"--family {bad[0]!r}: choose from {', '.join(synth.ALL_FAMILIES)}")
    try:
        summary = synth.synthesize(output, n_frames=n_frames, hr_shape=tuple(hr_size), stride=stride, offset=offset,
                                   seed=seed, families=list(families) or None, speed=speed, dtype=dtype,
                                   **({"effects": fx} if fx is not None else {}))
    except ValueError as exc:
        raise UserError(f"{output}: {exc}") from None
    click.echo(f"wrote {output}: " + json.dumps(summary, default=str))


def _synth_two_cameras(output, n_frames, hr_size, stride, offset, seed, families, speed, dtype, overwrite) -> None:
    from xvr_batch import synth
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{output}: exists and is not a folder (--two-cameras writes a folder)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{output}: folder is not empty; pass --overwrite or choose another folder")
    if not out.parent.is_dir():
        raise UserError(f"{output}: parent folder {out.parent} does not exist; create it first")
    bad = [f for f in families if f not in synth.ALL_FAMILIES]
    if bad:
        raise UserError(f"--family {bad[0]!r}: choose from {', '.join(synth.ALL_FAMILIES)}")
    if offset >= stride:
        raise UserError(f"--offset {offset}: with --two-cameras give an offset below --stride {stride} (the HR "
                        "camera starts one key interval before the LR camera)")
    try:
        truth = synth.two_cameras(output, n_frames=n_frames, hr_shape=tuple(hr_size), stride=stride, offset=offset,
                                  seed=seed, families=list(families) or None, speed=speed, dtype=dtype)
    except ValueError as exc:
        raise UserError(f"{output}: {exc}") from None
    f = truth["files"]
    click.echo(f"wrote {output}: " + json.dumps({k: truth[k] for k in ("rotation_deg", "scale_factor", "shift",
                                                                          "hr_index", "hr_delay")}))
    click.echo(f"assemble it with: xvr-batch assemble -o {out / 'archive.h5'} --lr {out / f['lr']} --lr-time "
               f"{out / f['lr_time']} --lr-dark {out / f['lr_dark']} --lr-flat {out / f['lr_flat']} --hr "
               f"{out / f['hr']} --hr-time {out / f['hr_time']} --hr-delay {truth['hr_delay']!r} --hr-dark "
               f"{out / f['hr_dark']} --hr-flat {out / f['hr_flat']}")


# ---------------------------------------------------------------------------------------- assemble / register

@command("assemble")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Archive to write.")
@click.option("--lr", "lr", required=True, metavar="SRC",
              help="LR frames: FILE.h5:/dataset, a TIFF file, folder or glob, or a Photron .cihx/.mraw.")
@click.option("--hr", "hr", required=True, metavar="SRC", help="HR frames (same kinds of SRC).")
@click.option("--lr-dark", default=None, metavar="SRC", help="LR dark frames.")
@click.option("--lr-flat", default=None, metavar="SRC", help="LR flat (white) frames.")
@click.option("--hr-dark", default=None, metavar="SRC", help="HR dark frames.")
@click.option("--hr-flat", default=None, metavar="SRC", help="HR flat (white) frames.")
@click.option("--lr-time", default=None, metavar="SRC",
              help="LR timestamps (s): FILE.h5:/dataset or a text/CSV file, one per frame.")
@click.option("--hr-time", default=None, metavar="SRC", help="HR timestamps (s), as --lr-time.")
@click.option("--lr-rate", type=float, default=None, metavar="HZ", help="LR frame rate (instead of --lr-time).")
@click.option("--hr-rate", type=float, default=None, metavar="HZ", help="HR frame rate (instead of --hr-time).")
@click.option("--hr-delay", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Added to HR times to put them on the LR clock (the reference).")
@click.option("--time-tolerance", type=float, default=0.25, show_default=True, metavar="PERIODS",
              help="Largest |HR time - LR time| of a match, in LR periods (< 0.5).")
@click.option("--link", is_flag=True, help="Reference HDF5 sources through external links / virtual datasets.")
@click.option("--no-register", is_flag=True, help="Do not fit /exchange/registration.")
@click.option("--affine", is_flag=True, help="Fit a full affine transform instead of shift+rotation+scale(+flip).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def assemble_cmd(output, lr, hr, lr_dark, lr_flat, hr_dark, hr_flat, lr_time, hr_time, lr_rate, hr_rate, hr_delay,
                 time_tolerance, link, no_register, affine, overwrite):
    """Build a standard archive from two cameras' files: match clocks, fit the registration."""
    from xvr_batch.assemble import assemble
    summary = assemble(output, lr, hr, lr_dark=lr_dark, lr_flat=lr_flat, hr_dark=hr_dark, hr_flat=hr_flat,
                       lr_time=lr_time, hr_time=hr_time, lr_rate=lr_rate, hr_rate=hr_rate, hr_delay=hr_delay,
                       tolerance=time_tolerance, link=link, overwrite=overwrite, register=not no_register,
                       affine=affine, log=_echo_err)
    click.echo(f"wrote {output}: {summary['n_frames']} LR frames, {len(summary['hr_index'])} key frames at "
               f"{summary['hr_index'][:8]}{' ...' if len(summary['hr_index']) > 8 else ''}")


@command("register")
@click.argument("archive", type=click.Path())
@archive_options
@click.option("-o", "--output", "reg_out", type=click.Path(dir_okay=False), default=None,
              help="Write the transform as JSON (the --registration FILE.json format).")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: checkerboards before/after and an overlay.")
@click.option("--affine", is_flag=True, help="Fit a full affine transform.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def register_cmd(archive, lr, hr, hr_index, hr_stride, hr_offset, wait_for_writer, reg_out, plot_out, affine,
                 as_json):
    """Fit the LR->HR registration of ARCHIVE on its key frames; report parameters, residual and overlap."""
    from xvr_batch.durable import atomic_write_bytes
    from xvr_batch.io.archive import Archive, ArchivePaths
    from xvr_batch.registration import fit_archive, plot
    base = ArchivePaths()
    paths = ArchivePaths(lr=lr or base.lr, hr=hr or base.hr, hr_index=hr_index or base.hr_index)
    with Archive(archive, paths, hr_stride, hr_offset, wait_for_writer=wait_for_writer) as arc:
        reg = fit_archive(arc, affine=affine, log=_echo_err)
        if plot_out:
            plot(arc, reg, plot_out)
    d = reg.to_dict()
    if reg_out:
        atomic_write_bytes(reg_out, (json.dumps(d, indent=2) + "\n").encode())
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        m = reg.matrix
        click.echo(f"{archive}: {reg.summary()}")
        click.echo(f"  matrix  [[{m[0, 0]:.6f}, {m[0, 1]:.6f}, {m[0, 2]:.4f}], [{m[1, 0]:.6f}, {m[1, 1]:.6f}, "
                   f"{m[1, 2]:.4f}]]  (LR pixel (x, y, 1) -> HR/{arc.scale} grid)")
        click.echo(f"  identity would give ncc {reg.stats['ncc_identity']:.3f}, residual "
                   f"{reg.stats['residual_identity']:.3f}")
    if reg_out:
        click.echo(f"transform written to {reg_out}")
    if plot_out:
        click.echo(f"plot written to {plot_out}")


# ---------------------------------------------------------------------------------------- evaluate

@command("evaluate")
@click.argument("recon", type=click.Path())
@click.option("--truth", required=True, type=click.Path(), help="Archive with /exchange/data_gt.")
@click.option("--frames", type=click.Choice(["between", "all"]), default="between", show_default=True,
              help="Score frames strictly between key frames, or every non-key frame.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Score an even subsample of frames.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the scores as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: PSNR over time plus a side-by-side panel.")
def evaluate_cmd(recon, truth, frames, max_frames, json_out, plot_out):
    """Score RECON against the truth: PSNR/SSIM per frame, and the classical baselines."""
    from xvr_batch import evaluate as ev
    result = ev.evaluate(recon, truth, frames=frames, max_frames=max_frames, progress=True)
    click.echo(ev.format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    if plot_out:
        ev.plot(result, recon, truth, plot_out)
        click.echo(f"plot written to {plot_out}")


# ---------------------------------------------------------------------------------------- validate / finetune

@command("validate")
@click.argument("archive", type=click.Path())
@click.option("--weights", default=None, metavar="W",
              help="Checkpoint (our format) or a shipped name. Default: shipped 'lite'.")
@click.option("--keys", "keys_spec", default=None, metavar="1,3,5|2:8",
              help="Key numbers (indices into hr_index) to validate [every interior key].")
@click.option("--registration", default="auto", show_default=True, metavar="auto|none|FILE.json",
              help="As reconstruct --registration.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: PSNR per key for each method, and one side-by-side panel.")
@click.option("--refine", type=click.Choice(["lr", "none"]), default="lr", show_default=True,
              help="As reconstruct --refine.")
def validate_cmd(archive, weights, keys_spec, registration, device, as_json, plot_out, refine):
    """Key-frame self-validation, for archives without dense truth: hide each interior key frame,
    reconstruct it from its two neighbours and the LR frames, and score it against the real key frame,
    next to the key-frame blend and bicubic LR baselines."""
    from xvr_batch import validate as va
    result = va.validate_archive(archive, weights=weights, keys=va.parse_keys(keys_spec), registration=registration,
                                 device=device, progress=not as_json, keep_images=bool(plot_out),
                                 log=(lambda s: None) if as_json else _echo_err, refine=refine)
    if plot_out:
        va.plot(result, plot_out)
    if as_json:
        click.echo(json.dumps(va.public(result), allow_nan=False))
        return
    click.echo(va.format_table(result))
    if plot_out:
        click.echo(f"plot written to {plot_out}")


@command("finetune")
@click.argument("archive", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Fine-tuned checkpoint (use it with reconstruct --weights).")
@click.option("--weights", default=None, metavar="BASE", help="Base weights [the shipped 'lite'].")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0), default=1e-4, show_default=True, help="Adam learning rate.")
@click.option("--crop", type=click.IntRange(min=4), default=24, show_default=True, help="LR crop (HR = 4x).")
@click.option("--holdout", type=click.IntRange(min=1), default=4, show_default=True,
              help="Hold out every N-th interior key for validation (at least one).")
@click.option("--max-gap", type=click.IntRange(min=1), default=2, show_default=True,
              help="Brackets k-j, k+j with 1 <= j <= this.")
@click.option("--registration", default="auto", show_default=True, metavar="auto|none|FILE.json",
              help="As reconstruct --registration.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune_cmd(archive, out, quiet, **kw):
    """Fine-tune the weights on ARCHIVE's own key frames (no dense truth): each target is a real key frame,
    reconstructed from keys k-j, k+j and the LR frames around it. Held-out keys are validated before and
    after. Under torchrun or srun: DDP. A stopped run (exit 75) continues with the same command."""
    from xvr_batch import finetune as ft
    from xvr_batch.train import TrainingStopped
    try:
        res = ft.run_finetune(ft.options(archive=archive, out=out, progress=not quiet, **kw), log=_echo_err)
    except TrainingStopped as exc:
        from xvr_batch.errors import EXIT_STOPPED
        _echo_err(str(exc))
        sys.exit(EXIT_STOPPED)
    click.echo(res["out"])


# ---------------------------------------------------------------------------------------- preview

@command("preview")
@click.argument("recon", type=click.Path())
@click.option("--archive", type=click.Path(), default=None,
              help="The input archive [the path recorded in RECON, if it exists]; adds LR, key-frame blend, truth.")
@click.option("--frames", default=None, metavar="A:B", help="Frame range, Python slice bounds (100:140, -20:) [all].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="FILE.png (a strip of up to 6 frames), FILE.gif or FILE.mp4 (a movie).")
@click.option("--fps", type=click.FloatRange(min=0.1, max=120), default=10.0, show_default=True,
              help="Frames per second of a movie.")
def preview_cmd(recon, archive, frames, output, fps):
    """Side by side, per frame: LR upsampled, the reconstruction, the key-frame blend and the truth (if any)."""
    from xvr_batch.preview import write_preview
    info = write_preview(recon, output, archive=archive, frames=frames, fps=fps)
    click.echo(f"wrote {info['output']}: {len(info['frames'])} frame(s), panels {', '.join(info['panels'])}")


# ---------------------------------------------------------------------------------------- convert-weights

@command("convert-weights")
@click.argument("checkpoint", type=click.Path())
@click.option("--network-g", required=True, type=click.Path(dir_okay=False),
              help="YAML with the reference's network_g (a full training YAML or just the block).")
@click.option("--head", type=click.Choice(["all", "centre"]), default="all", show_default=True,
              help="all = the reference's VSTF model, centre = its STF model.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Our checkpoint file.")
def convert_weights_cmd(checkpoint, network_g, head, output):
    """Convert an XFusion checkpoint (params_ema preferred) to xvr_batch's format."""
    import yaml
    from xvr_batch.model import from_xfusion, save_checkpoint
    try:
        data = yaml.safe_load(Path(network_g).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{network_g}: cannot read the network_g YAML ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("network_g"), dict):
        data = data["network_g"]
    if not isinstance(data, dict):
        raise UserError(f"{network_g}: expected a mapping with the network_g keys (num_frame, embed_dim, ...)")
    model = from_xfusion(checkpoint, data, head=head)
    sha = save_checkpoint(output, model, params_ema=model.state_dict(),
                          meta={"converted_from": str(checkpoint), "network_g": data})
    click.echo(f"wrote {output} (sha256 {sha[:16]}...)")


# ---------------------------------------------------------------------------------------- demo

@command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Folder for the demo archive and output [a new temp folder].")
@click.option("--frames", type=click.IntRange(min=21), default=60, show_default=True,
              help="Archive length (a key frame every 20 frames, at least two).")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the demo archive.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(directory, frames, seed, quiet):
    """Make a small synthetic archive, reconstruct it with the default weights, and score it."""
    from xvr_batch.demo import run_demo
    d = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="xvr-demo-"))
    d.mkdir(parents=True, exist_ok=True)
    run_demo(d, frames=frames, seed=seed, progress=not quiet, echo=click.echo)


# ---------------------------------------------------------------------------------------- train

@command("train")
@click.argument("archives", nargs=-1, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Final checkpoint path.")
@click.option("--val", "val_archives", multiple=True, type=click.Path(), help="Validation archive (repeatable).")
@click.option("--preset", default="lite", show_default=True, help="Model preset: lite, paper, tiny.")
@click.option("--head", type=click.Choice(["all", "centre"]), default="all", show_default=True)
@click.option("--init", default=None, help="Fine-tune from our checkpoint or an XFusion .pth.")
@click.option("--network-g", "xfusion_network_g", default=None, help="YAML of network_g, with an XFusion --init.")
@click.option("--resume", default=None, help="Training checkpoint to resume exactly.")
@click.option("--steps", type=click.IntRange(min=1), default=20000, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Adam learning rate.")
@click.option("--crop", type=click.IntRange(min=4), default=24, show_default=True, help="LR crop (HR = 4x).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--p-motion", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of samples that are the most moving of 4 random crops (the shipped weights: 0.5).")
@click.option("--p-noise", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of samples with extra Poisson noise on the LR frames (the shipped weights: 0).")
@click.option("--drop-path", type=click.FloatRange(0, 1), default=None,
              help="Stochastic depth rate [default: the preset's].")
@click.option("--loss", type=click.Choice(["l1", "psnr"]), default="l1", show_default=True,
              help="l1: mean absolute error over all pixels. psnr: the mean log of each output frame's squared "
                   "error, which weighs frames as the mean per-frame PSNR does.")
@click.option("--time-cond/--no-time-cond", default=None,
              help="Tell the network where each LR frame lies between its keys; over --init weights without it, "
                   "the new parameters start at zero [default: the preset's or the init weights'].")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes per rank.")
@click.option("--device", default="auto", show_default=True)
@click.option("--val-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_cmd(archives, quiet, **kw):
    """Train SWIN-XVR on ARCHIVES (with /exchange/data_gt). Under torchrun or srun: DDP."""
    from xvr_batch import train as tr
    if not archives:
        raise UserError("give at least one training archive (make some with `xvr-batch synth`)")
    names = {f.name for f in fields(tr.TrainOptions)}
    opts = tr.TrainOptions(archives=list(archives), progress=not quiet,
                           **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k in names})
    try:
        path = tr.run_training(opts, log=_echo_err)
    except tr.TrainingStopped as exc:  # SIGUSR2/SIGTERM: checkpoint written; the same command continues
        from xvr_batch.errors import EXIT_STOPPED
        _echo_err(str(exc))
        sys.exit(EXIT_STOPPED)
    click.echo(path)


# ---------------------------------------------------------------------------------------- entry point

def _format_warning(message, category, filename, lineno, line=None):  # noqa: ARG001
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("XVR_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    warnings.formatwarning = _format_warning
    try:
        main_group.main(args=argv, prog_name="xvr-batch", standalone_mode=False)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        _echo_err(f"error: {exc}")
        sys.exit(2)
    except OSError as exc:
        from xvr_batch.pipeline import disk_error
        err = disk_error(exc, getattr(exc, "filename", None) or "output")
        if not isinstance(err, UserError):
            raise
        if debug:
            traceback.print_exc()
        _echo_err(f"error: {err}")
        sys.exit(2)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _echo_err("interrupted; re-run the same command to resume")
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
