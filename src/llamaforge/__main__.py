"""`python -m llamaforge ...` and `torchrun --nproc-per-node N -m llamaforge train CONFIG`.

Under torchrun, `record` writes a failing rank's traceback where the launcher reports it, so
the job ends with that rank's message (torchrun then stops the ranks still waiting).
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main

if __name__ == "__main__":
    sys.exit(record(main)())
