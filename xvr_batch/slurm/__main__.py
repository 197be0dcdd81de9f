"""``python -m xvr_batch.slurm NAME``: print sbatch template NAME with its shared blocks spliced in."""
import sys

from xvr_batch.slurm.template import main

sys.exit(main())
