"""The Slurm job-script builder and the sbatch templates, without a cluster.

Golden lists of #SBATCH lines, refusal of hostile values, and proof that a hostile value cannot run:
rendered scripts are executed by bash in a sandbox whose srun/scontrol/python3 are stand-ins that
end up running `echo`.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from xvr_batch.slurm import client
from xvr_batch.slurm.script import LAUNCHERS, JobSpec, job_name_for, render_job_script, sbatch_directives, validate_spec
from xvr_batch.slurm.shell import BLOCKS, marker_line, rendezvous_block, stop_block
from xvr_batch.slurm.template import (
    render_template,
    template_names,
    template_placeholders,
    template_text,
    templates_dir,
)
from xvr_batch.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = [
    "dask-worker.sbatch",
    "reconstruct-1node-torchrun.sbatch",
    "reconstruct-multinode-srun-mpi.sbatch",
    "reconstruct-multinode-srun-torch.sbatch",
    "train-ddp-multinode.sbatch",
]
COMMAND = ["xvr-batch", "reconstruct", "/data/a b.h5", "-o", "out.h5", "--backend", "torch"]


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """Environment for running a job script with bash alone: stand-ins for the Slurm tools.

    `srun` drops its options and runs the rest, `scontrol show hostnames` prints a node name,
    `python3 -m torch.distributed.run ... --no-python CMD...` runs CMD, `xvr-batch` is echo.
    """
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    write_exe(bin_dir / "srun", '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    write_exe(bin_dir / "scontrol", '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo node001\n')
    write_exe(bin_dir / "python3", '#!/bin/bash\nwhile [ "$1" != --no-python ]; do shift; done\nshift\nexec "$@"\n')
    write_exe(bin_dir / "xvr-batch", '#!/bin/bash\necho xvr-batch "$@"\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "XVR_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node001")
    return env


def run_script(text: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = tmp_path / f"job-{uuid.uuid4().hex[:8]}.sbatch"
    script.write_text(text)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    return subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)


# ---- golden #SBATCH lines -------------------------------------------------------------------------


def test_cpu_job_directives() -> None:
    script = render_job_script(JobSpec(), ["true"], launcher="none")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=xvr-batch",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --output=xvr-%j.out",
        "#SBATCH --signal=B:USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    assert "--gres" not in script


def test_one_node_four_gpus_uses_torchrun() -> None:
    spec = JobSpec(job_name="recon", gpus_per_node=4, cpus_per_task=8, mem="64G")
    script = render_job_script(spec, COMMAND, launcher="torch")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=recon",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --mem=64G",
        "#SBATCH --output=xvr-%j.out",
        "#SBATCH --signal=B:USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    assert (
        '"$XVR_PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=4 --no-python '
        "xvr-batch reconstruct '/data/a b.h5' -o out.h5 --backend torch &"
    ) in script
    assert "XVR_FORWARD=children" in script
    assert "srun" not in script.split("# ---- The step")[1].split("XVR_STEP_PID=$!")[0]


def test_eight_nodes_with_account_partition_time() -> None:
    spec = JobSpec(nodes=8, gpus_per_node=4, cpus_per_task=16, partition="gpu", account="bl32-id", time="1-12:00:00")
    script = render_job_script(spec, COMMAND, launcher="torch")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=xvr-batch",
        "#SBATCH --nodes=8",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=bl32-id",
        "#SBATCH --time=1-12:00:00",
        "#SBATCH --output=xvr-%j.out",
        "#SBATCH --signal=B:USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=16 xvr-batch reconstruct '/data/a b.h5'" in script
    assert "XVR_FORWARD=srun" in script
    assert "32 processes, 4 per node" in script


def test_extra_directives_no_requeue_custom_output_and_signal() -> None:
    spec = JobSpec(
        ntasks_per_node=2,
        output="/scratch/logs/%x-%j.out",
        signal="B:USR1@600",
        requeue=False,
        extra_directives=["--qos=high", "--constraint=a100", "--mail-type END"],
    )
    script = render_job_script(spec, ["xvr-batch", "reconstruct", "a.h5"], launcher="mpi")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=xvr-batch",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --output=/scratch/logs/%x-%j.out",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --no-requeue",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --mail-type END",
    ]
    assert "srun --mpi=pmi2 --kill-on-bad-exit=1 xvr-batch reconstruct a.h5 &" in script
    assert "XVR_WARN_SIGNAL=USR1" in script and "XVR_REQUEUE=0" in script
    assert "600 s before the time limit Slurm sends SIGUSR1" in script


def test_output_path_with_spaces_is_quoted_for_sbatch() -> None:
    spec = JobSpec(output="/data/run 42 (test).h5.slurm-%j.log")
    assert '#SBATCH --output="/data/run 42 (test).h5.slurm-%j.log"' in sbatch_lines(render_job_script(spec, ["true"], "none"))


def test_no_signal_line_when_signal_is_none() -> None:
    script = render_job_script(JobSpec(signal=None), ["true"], launcher="none")
    assert not any("--signal" in line for line in sbatch_lines(script))
    assert "XVR_WARN_SIGNAL=\n" in script


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_directives_precede_commands_and_blocks_are_shared(launcher: str) -> None:
    """sbatch stops reading #SBATCH lines at the first command: all of them must come first."""
    spec = JobSpec(nodes=2, gpus_per_node=2, setup=["module load cuda"], env={"OMP_NUM_THREADS": "4"}, workdir="/w")
    script = render_job_script(spec, COMMAND, launcher=launcher)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    assert stop_block() in script and script.rstrip().endswith("&\nxvr_finish $!")
    assert "module load cuda\n" in script and "export OMP_NUM_THREADS=4\n" in script
    assert "cd -- /w\n" in script


def test_sbatch_directives_matches_rendered_lines() -> None:
    spec = JobSpec(nodes=3, gpus_per_node=1, time="00:30:00")
    assert ["#SBATCH " + option for option in sbatch_directives(spec)] == sbatch_lines(
        render_job_script(spec, ["true"], launcher="none")
    )


def test_torchrun_uses_the_python_of_the_command() -> None:
    script = render_job_script(JobSpec(gpus_per_node=2), ["/opt/env/bin/python3.11", "-m", "xvr_batch"], "torch")
    assert 'XVR_PYTHON=/opt/env/bin/python3.11; fi' in script
    script = render_job_script(JobSpec(gpus_per_node=2), ["xvr-batch"], "torch")
    assert 'XVR_PYTHON=python3; fi' in script


def test_dask_worker_is_stopped_with_term() -> None:
    one = render_job_script(JobSpec(), ["python", "-m", "distributed.cli.dask_worker", "tcp://h:8786"], "dask-worker")
    assert "XVR_FORWARD=process" in one and "XVR_FORWARD_AS=TERM" in one
    assert "\npython -m distributed.cli.dask_worker tcp://h:8786 &\n" in one
    many = render_job_script(JobSpec(nodes=4), ["dask-worker", "tcp://h:8786"], "dask-worker")
    assert "srun --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1 dask-worker tcp://h:8786 &" in many


# ---- refused values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "time_limit",
    ["1:00", "60", "01:60:00", "01:00:60", "1-24:00:00", "abc", "", "-1:00:00", "01:00:00; rm -rf /",
     "01:00:00\n#SBATCH --x", "00:00:00", "1-2", " 01:00:00"],
)
def test_bad_time_formats(time_limit: str) -> None:
    with pytest.raises(UserError, match="time limit"):
        validate_spec(JobSpec(time=time_limit))


@pytest.mark.parametrize("time_limit", ["01:00:00", "100:00:00", "0:05:00", "2-00:00:00", "0-23:59:59", "14-00:00:00"])
def test_good_time_formats(time_limit: str) -> None:
    validate_spec(JobSpec(time=time_limit))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (JobSpec(partition="debug; rm -rf /"), "partition"),
        (JobSpec(partition="gpu\n#SBATCH --x"), "partition"),
        (JobSpec(account="$(id)"), "account"),
        (JobSpec(job_name="a b"), "job name"),
        (JobSpec(job_name="x\n#SBATCH --uid=0"), "line break"),
        (JobSpec(output='log-%j".out'), "output"),
        (JobSpec(output="log\\%j.out"), "output"),
        (JobSpec(output="a\0b"), "NUL"),
        (JobSpec(extra_directives=["--qos=high\n#SBATCH --uid=0"]), "line break"),
        (JobSpec(extra_directives=["--qos=high\r--x"]), "line break"),
        (JobSpec(extra_directives=["--comment=$(touch /tmp/x)"]), "directive"),
        (JobSpec(extra_directives=["--comment=`id`"]), "directive"),
        (JobSpec(extra_directives=["--comment='a'"]), "directive"),
        (JobSpec(extra_directives=["qos=high"]), "starting with '-'"),
        (JobSpec(extra_directives=["--qos=a\0b"]), "NUL"),
        (JobSpec(env={"NOT AN IDENT": "x"}), "identifier"),
        (JobSpec(env={"X;rm": "x"}), "identifier"),
        (JobSpec(env={"X": "a\0b"}), "NUL"),
        (JobSpec(setup=["module load a\0"]), "NUL"),
        (JobSpec(nodes=0), "nodes"),
        (JobSpec(nodes=True), "nodes"),  # type: ignore[arg-type]
        (JobSpec(gpus_per_node=-1), "GPUs"),
        (JobSpec(ntasks_per_node=0), "tasks"),
        (JobSpec(cpus_per_task=0), "CPUs"),
        (JobSpec(mem="64 G"), "memory"),
        (JobSpec(signal="B:USR2@120;x"), "signal"),
        (JobSpec(workdir="a\0b"), "work directory"),
    ],
)
def test_hostile_or_bad_values_are_refused(spec: JobSpec, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        render_job_script(spec, ["true"], launcher="none")
    assert "\n" not in str(info.value)


def test_bad_command_and_launcher() -> None:
    with pytest.raises(UserError, match="non-empty list"):
        render_job_script(JobSpec(), [], launcher="none")
    with pytest.raises(UserError, match="non-empty list"):
        render_job_script(JobSpec(), "xvr-batch reconstruct", launcher="none")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="NUL"):
        render_job_script(JobSpec(), ["echo", "a\0b"], launcher="none")
    with pytest.raises(UserError, match="unknown launcher"):
        render_job_script(JobSpec(), ["true"], launcher="pbs")


# ---- hostile values never run -------------------------------------------------------------------


def hostile_args(marker: Path) -> list[str]:
    return [f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}", f"a'b\"c $HOME {marker}", "two\nlines", "*"]


@pytest.mark.parametrize(("launcher", "nodes"), [("none", 1), ("torch", 1), ("torch", 2), ("mpi", 1), ("dask-worker", 2)])
def test_hostile_arguments_are_quoted_and_never_run(launcher: str, nodes: int, tmp_path: Path, sandbox: dict[str, str]) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    args = hostile_args(marker)
    spec = JobSpec(nodes=nodes, gpus_per_node=2, env={"XVR_HOSTILE": f"$(touch {marker})"}, workdir=str(tmp_path))
    script = render_job_script(spec, ["echo", *args], launcher=launcher)
    try:
        result = run_script(script, tmp_path, sandbox)
        assert not marker.exists(), "a value in the job script was executed"
        assert result.returncode == 0, result.stderr
        assert result.stdout == " ".join(args) + "\n"
    finally:
        marker.unlink(missing_ok=True)


def test_env_values_and_workdir_are_quoted(tmp_path: Path, sandbox: dict[str, str]) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    workdir = tmp_path / "dir with $(touch pwned) `touch pwned` 'quotes'"
    workdir.mkdir()
    value = f"$(touch {marker}) `id` ' \" \\"
    spec = JobSpec(env={"XVR_HOSTILE": value}, workdir=str(workdir))
    script = render_job_script(spec, ["bash", "-c", 'printf "%s|%s" "$PWD" "$XVR_HOSTILE"'], launcher="none")
    try:
        result = run_script(script, tmp_path, sandbox)
        assert not marker.exists() and not list(tmp_path.rglob("pwned"))
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{workdir}|{value}"
    finally:
        marker.unlink(missing_ok=True)


def test_exit_status_of_the_step_is_the_jobs(tmp_path: Path, sandbox: dict[str, str]) -> None:
    script = render_job_script(JobSpec(), ["bash", "-c", "exit 7"], launcher="none")
    assert run_script(script, tmp_path, sandbox).returncode == 7


def test_usr2_is_forwarded_to_the_step_without_slurm(tmp_path: Path, sandbox: dict[str, str]) -> None:
    """The trap passes SIGUSR2 on; the step stops cleanly; no requeue is tried when disabled."""
    ready, marker = tmp_path / "ready", tmp_path / "got"
    step = f'trap "echo USR2 > {marker}; exit 0" USR2; touch {ready}; for i in $(seq 300); do sleep 0.1; done; exit 9'
    script = tmp_path / "job.sbatch"
    script.write_text(render_job_script(JobSpec(requeue=False), ["bash", "-c", step], launcher="none"))
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=sandbox, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if ready.exists():
                break
            subprocess.run(["sleep", "0.05"])
        proc.send_signal(12)  # SIGUSR2, as Slurm's --signal=B:USR2 would
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert marker.read_text().strip() == "USR2"
    assert proc.returncode == 0, stderr
    assert "got SIGUSR2" in stderr


# ---- templates ------------------------------------------------------------------------------------


def template_values(name: str, fakebin: Path) -> dict[str, object]:
    common: dict[str, object] = {
        "job_name": "xvr-test",
        "nodes": 2,
        "ntasks_per_node": 2,
        "gpus_per_node": 2,
        "cpus_per_task": 1,
        "mem": "2G",
        "partition": "debug",
        "account": "bl32",
        "time": "00:10:00",
        "output": "xvr-%j.out",
        "python": str(fakebin / "python3"),
        "archive": "/data/run 42.h5",
        "out_h5": "/data/out.h5",
        "extra_args": ["--dtype", "uint16"],
        "nproc_per_node": 2,
        "train_args": ["--steps", "4", "-o", "/data/m.pt", "/data/a.h5"],
        "scheduler": "tcp://127.0.0.1:8786",
        "cores": 2,
        "memory": "2G",
        "nthreads": 1,
        "processes": 2,
        "memory_limit": "1GB",
        "walltime": "00:10:00",
        "interface": "lo",
        "local_directory": "/tmp/dask scratch",
        "death_timeout": 60,
        "resources": "GPU=1",
    }
    return {key: value for key, value in common.items() if key in template_placeholders(name)}


def test_template_list() -> None:
    assert template_names() == TEMPLATES
    assert templates_dir() == REPO / "xvr_batch" / "slurm" / "templates"


def test_slurm_folder_is_a_link_to_the_only_copy() -> None:
    """slurm/ in the checkout is a symlink to the package's templates: one copy, no drift."""
    assert (REPO / "slurm").is_symlink()
    assert (REPO / "slurm").resolve() == templates_dir()
    assert not (REPO / "xvr_batch" / "templates").exists()


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_renders_and_passes_bash_n(name: str, tmp_path: Path, sandbox: dict[str, str]) -> None:
    raw = (templates_dir() / name).read_text()
    assert marker_line("stop-requeue") + "\n" in raw and "xvr_finish $!\n" in raw
    assert "xvr_forward()" not in raw and "MASTER_PORT=" not in raw, "shared shell code is copied, not spliced"
    fakebin = Path(sandbox["PATH"].split(os.pathsep)[0])
    text = render_template(name, **template_values(name, fakebin))
    assert stop_block() in text and "@xvr-batch-block" not in text
    code = [line for line in text.splitlines() if line.startswith("#SBATCH") or not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"\$\{?[a-z]", line)], "a placeholder was left unfilled"
    assert "#SBATCH --gres=gpu:2" in text and "#SBATCH --partition=debug" in text
    syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # The raw template is valid shell too (users copy and edit it).
    assert subprocess.run(["bash", "-n"], input=raw, capture_output=True, text=True).returncode == 0


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_cpu_render_drops_gres_and_site_lines(name: str, tmp_path: Path) -> None:
    values = template_values(name, tmp_path)
    values.update(gpus_per_node=0, partition=None, account=None)
    text = render_template(name, **values)
    directives = sbatch_lines(text)
    assert not any(line.startswith(("#SBATCH --gres", "#SBATCH --partition", "#SBATCH --account")) for line in directives)
    assert "#SBATCH --job-name=xvr-test" in directives


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "dask-worker.sbatch"])
def test_template_hostile_values_never_run(name: str, tmp_path: Path, sandbox: dict[str, str]) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    fakebin = Path(sandbox["PATH"].split(os.pathsep)[0])
    values = template_values(name, fakebin)
    for key in ("archive", "out_h5"):
        if key in values:
            values[key] = f"$(touch {marker}) `touch {marker}`"
    for key in ("extra_args", "train_args"):
        if key in values:
            values[key] = [f"; touch {marker}", "a b"]
    try:
        result = run_script(render_template(name, **values), tmp_path, sandbox)
        assert not marker.exists()
        assert result.returncode == 0, result.stderr
        assert f"`touch {marker}`" in result.stdout or f"; touch {marker} a b" in result.stdout
    finally:
        marker.unlink(missing_ok=True)


def test_template_refuses_bad_values() -> None:
    values = template_values("reconstruct-multinode-srun-mpi.sbatch", Path("/x"))
    with pytest.raises(UserError, match="partition"):
        render_template("reconstruct-multinode-srun-mpi", **{**values, "partition": "debug; rm -rf /"})
    with pytest.raises(UserError, match="time limit"):
        render_template("reconstruct-multinode-srun-mpi", **{**values, "time": "25"})
    with pytest.raises(UserError, match="line break"):
        render_template("reconstruct-multinode-srun-mpi", **{**values, "output": "x.out\n#SBATCH --uid=0"})
    with pytest.raises(UserError, match="not allowed"):
        render_template("reconstruct-multinode-srun-mpi", **{**values, "job_name": "$(id)"})
    with pytest.raises(UserError, match="negative"):
        render_template("reconstruct-multinode-srun-mpi", **{**values, "gpus_per_node": -1})
    with pytest.raises(UserError, match="needs value"):
        render_template("reconstruct-multinode-srun-mpi", **{k: v for k, v in values.items() if k != "archive"})
    with pytest.raises(UserError, match="no placeholder"):
        render_template("reconstruct-multinode-srun-mpi", **values, partiton="debug")
    with pytest.raises(UserError, match="no sbatch template"):
        render_template("../../etc/passwd")


def test_template_placeholders_required_flags() -> None:
    placeholders = template_placeholders("reconstruct-multinode-srun-torch")
    assert placeholders["archive"] is True and placeholders["partition"] is False
    assert "SLURM_JOB_ID" not in placeholders and "XVR_STEP_PID" not in placeholders


# ---- submission helpers, with stand-in Slurm commands ---------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-in sbatch/squeue/scontrol/scancel that log their arguments to calls.log."""
    bin_dir = tmp_path / "slurmbin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    record = f'echo "$(basename "$0") $*" >> {log}\n'
    write_exe(bin_dir / "sbatch", f"#!/bin/bash\n{record}echo '4242;cluster'\n")
    write_exe(bin_dir / "squeue", f"#!/bin/bash\n{record}[ \"$3\" = 1 ] && echo RUNNING\nexit 0\n")
    write_exe(
        bin_dir / "scontrol",
        f"#!/bin/bash\n{record}[ \"$3\" = 2 ] && echo 'JobId=2 JobName=x\n   JobState=COMPLETED Reason=None' && exit 0\n"
        "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n",
    )
    write_exe(bin_dir / "scancel", f"#!/bin/bash\n{record}")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_submit_writes_script_and_returns_job_id(tmp_path: Path, fake_slurm: Path) -> None:
    workdir = tmp_path / "work dir"
    job_id = client.submit("#!/bin/bash\ntrue", str(workdir))
    assert job_id == "4242"
    assert (workdir / "job.sbatch").read_text() == "#!/bin/bash\ntrue\n"
    assert fake_slurm.read_text() == f"sbatch --parsable {workdir / 'job.sbatch'}\n"


def test_submit_errors(tmp_path: Path) -> None:
    failing = write_exe(tmp_path / "sbatch-fails", "#!/bin/bash\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    with pytest.raises(UserError, match="invalid partition specified: nope"):
        client.submit("#!/bin/bash\n", str(tmp_path / "w"), sbatch=str(failing))
    with pytest.raises(UserError, match="not found"):
        client.submit("#!/bin/bash\n", str(tmp_path / "w"), sbatch=str(tmp_path / "no-such-sbatch"))


def test_job_state_squeue_then_scontrol(fake_slurm: Path) -> None:
    assert client.job_state("1") == "RUNNING"
    assert client.job_state("2") == "COMPLETED"  # gone from squeue, still known to scontrol
    assert client.job_state("3") is None  # purged
    with pytest.raises(UserError, match="not a Slurm job id"):
        client.job_state("1; rm -rf /")


def test_wait_for_job_follows_states(monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter(["PENDING", "RUNNING", "COMPLETING", "CANCELLED+"])
    monkeypatch.setattr(client, "job_state", lambda job_id: next(states))
    seen: list[object] = []
    assert client.wait_for_job("7", poll=0, on_poll=seen.append) == "CANCELLED"
    assert seen == ["PENDING", "RUNNING", "COMPLETING", "CANCELLED+"]
    monkeypatch.setattr(client, "job_state", lambda job_id: None)
    assert client.wait_for_job("7", poll=0) == "UNKNOWN"
    monkeypatch.setattr(client, "job_state", lambda job_id: "PENDING")
    with pytest.raises(UserError, match="still PENDING"):
        client.wait_for_job("7", poll=0.01, timeout=0.05)


def test_cancel_arguments(fake_slurm: Path) -> None:
    client.cancel("5")
    client.cancel("5", signal="USR2")
    client.cancel("5", signal="SIGTERM", target="full")
    client.cancel("5", signal="USR1", target="steps")
    assert fake_slurm.read_text().splitlines() == [
        "scancel 5",
        "scancel --signal=USR2 --batch 5",
        "scancel --signal=TERM --full 5",
        "scancel --signal=USR1 5",
    ]
    with pytest.raises(UserError, match="signal"):
        client.cancel("5", signal="USR2; reboot")
    with pytest.raises(UserError, match="target"):
        client.cancel("5", signal="USR2", target="node")


def test_module_runs_without_slurm_installed() -> None:
    """Rendering needs no Slurm tools: it is pure Python."""
    code = ("import sys; from xvr_batch.slurm import *; "
            "print(len(render_job_script(JobSpec(), ['true'], 'none')) > 0, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env={"PATH": "/nonexistent"}, capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "True False", result.stderr
