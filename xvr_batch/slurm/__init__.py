"""Everything Slurm, in one place.

* :mod:`~xvr_batch.slurm.script`: :class:`JobSpec`, its validation, and the job-script builder;
* :mod:`~xvr_batch.slurm.shell`: the shell blocks every script shares (stop signals, exit status,
  requeue; the torch.distributed rendezvous), spliced into scripts and templates from one copy;
* :mod:`~xvr_batch.slurm.template`: the sbatch templates in ``templates/`` (``slurm/`` in a checkout);
* :mod:`~xvr_batch.slurm.client`: sbatch/squeue/scontrol/scancel, and the one job-state classification;
* :mod:`~xvr_batch.slurm.submit`: ``reconstruct --nodes N`` (imports the pipeline, so not imported here);
* :mod:`~xvr_batch.slurm.ports`: the ``MASTER_PORT`` rule; :mod:`~xvr_batch.slurm.stopmark`: the marker a
  cleanly stopped rank leaves for its job script.

Importing this package needs no Slurm tools and no torch.
"""

from __future__ import annotations

from xvr_batch.slurm.client import (
    ACTIVE_STATES, FINAL_STATES, SCRIPT_NAME, base_state, cancel, is_final, job_state, submit, wait_for_job,
)
from xvr_batch.slurm.script import LAUNCHERS, JobSpec, job_name_for, render_job_script, sbatch_directives, validate_spec
from xvr_batch.slurm.shell import marker_line, rendezvous_block, splice, stop_block
from xvr_batch.slurm.template import (
    render_template, template_names, template_placeholders, template_text, templates_dir,
)

__all__ = [
    "ACTIVE_STATES", "FINAL_STATES", "LAUNCHERS", "SCRIPT_NAME", "JobSpec", "base_state", "cancel", "is_final",
    "job_name_for", "job_state", "marker_line", "render_job_script", "render_template", "rendezvous_block",
    "sbatch_directives", "splice", "stop_block", "submit", "template_names", "template_placeholders",
    "template_text", "templates_dir", "validate_spec", "wait_for_job",
]
