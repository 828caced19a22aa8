"""`python -m llamaforge ...` and `torchrun --nproc-per-node N -m llamaforge train CONFIG`.

Under torchrun, `record` writes a failing rank's traceback where the launcher reports it, so
the job ends with that rank's message (torchrun then stops the ranks still waiting). A rank
that finishes leaves the process group before the interpreter exits: a gloo/NCCL group still
alive at exit can abort the process ("terminate called without an active exception").
"""

import sys

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main


def run() -> int:
    try:
        return main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # after the run's own final barrier or failure


if __name__ == "__main__":
    sys.exit(record(run)())
