"""The shared training loop and its parts: batches, optimizer, checkpoints, metrics."""

from .batches import BatchSource, collate
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import NonFiniteLossError, TrainResult, evaluate_loss, make_eval_fn, train
from .metrics import is_main_process

__all__ = [
    "BatchSource",
    "NonFiniteLossError",
    "TrainResult",
    "collate",
    "evaluate_loss",
    "is_main_process",
    "latest_checkpoint",
    "load_checkpoint",
    "make_eval_fn",
    "save_checkpoint",
    "train",
]
