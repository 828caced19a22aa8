"""Run under torchrun by tests/test_distributed.py: every distributed scenario in one launch.

`python -m torch.distributed.run --nproc-per-node N -m tests.dist_worker OUT SCENARIO...`,
where a scenario `cli=CONFIG` is `llamaforge train CONFIG` in the same process group.
Each scenario trains a tiny model through the shared loop under FSDP2 or DDP (gloo, CPU) and
rank 0 writes OUT/<scenario>/result.pt (losses, skipped steps, gathered trainable weights);
every rank writes OUT/<scenario>/rank<r>.json. The test compares them with one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from llamaforge.cli import main as cli
from llamaforge.config import DistributedConfig
from llamaforge.train import distributed
from llamaforge.train.loop import train
from tests.dist_cases import CASES, build_case, case_cfg, case_eval, case_source


def run_case(name: str, out: Path) -> None:
    """Train one scenario at this job's world size."""
    case = CASES[name]
    env = distributed.init(DistributedConfig(strategy=case.strategy), torch.device("cpu"))
    assert env is not None
    model, loss_fn = build_case(case, rank=env.rank, world=env.world)
    wrapped = distributed.wrap(model, loss_fn, env, precision=case.precision)
    nf4 = [p for n, p in model.named_parameters() if n.endswith(".packed")]  # QLoRA codes
    source = case_source(case, env.rank, env.world)
    cfg = case_cfg(case, grad_accum=case.accum_per_rank(env.world), out=out)
    eval_fn = case_eval(case, wrapped, env.rank, env.world)
    result = train(
        model, source=source, loss_fn=wrapped, cfg=cfg, out_dir=out / name, eval_fn=eval_fn
    )
    full = distributed.gather_trainable(model)
    info = {"rank": env.rank, "steps": result.step, "skipped": result.skipped_steps}
    info["eval"] = result.last_eval
    info["stop_reason"] = result.stop_reason
    info["nf4_local"] = sum(p.to_local().numel() for p in nf4)
    info["nf4_total"] = sum(p.numel() for p in nf4)
    (out / name / f"rank{env.rank}.json").write_text(json.dumps(info))
    if env.main:
        torch.save({"losses": result.losses, "weights": full, **info}, out / name / "result.pt")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out = Path(argv[0])
    for name in argv[1:]:
        if name.startswith("cli="):  # the command line, as `torchrun -m llamaforge train`
            assert cli(["train", name.removeprefix("cli="), "logging.tensorboard=false"]) == 0
        else:
            run_case(name, out)
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    # Every result is written and the group destroyed: leave without interpreter teardown,
    # where gloo's worker threads can still abort a finished rank ("terminate called without
    # an active exception", once in a full CI run on 2026-12-07; pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
