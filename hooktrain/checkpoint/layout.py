"""The names of the files in a run's work directory and its checkpoints, defined once.

Plain strings only (no imports), so any module, the built-in plugins included, can use them
without loading the checkpoint code. The layout is described in :mod:`hooktrain.checkpoint.state`
and docs/checkpoints.md.
"""

from __future__ import annotations

# The work directory.
RECIPE = "recipe.yaml"  # the resolved recipe (also inside each checkpoint and ``best/``)
HISTORY_FILE = "metrics.jsonl"  # the logger hook's metric history, read by ``hooktrain plot``
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".hooktrain.lock"  # held by the run training in the work dir (``checkpoint.lock``)
STOPPED = "stopped.json"  # a run that stopped to be resumed (``checkpoint.stopped``)

# <work_dir>/checkpoints/
LATEST = "latest"  # a text file naming the newest complete checkpoint
BEST = "best"

# Inside a checkpoint: Accelerate's ``save_state`` files...
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.bin"
SCHEDULER = "custom_checkpoint_0.pkl"  # the LR scheduler, Accelerate's first registered object
SCALER = "scaler.pt"  # the GradScaler's state: written only with fp16
RANDOM_STATES_GLOB = "random_states_*.pkl"
# ...and hooktrain's own.
TRAIN_STATE = "train_state.json"
HOOKS = "hooks.pt"
SHARDED = "sharded"  # with train.sharded_checkpoint: the model and optimizer shards (``checkpoint.dcp``)
BEST_RECORD = "best.json"  # in ``best/``: ``{"key", "value", "iter"}``


def random_states_file(rank: int) -> str:
    return f"random_states_{rank}.pkl"


def data_state_file(rank: int) -> str:
    return f"data_state_rank{rank}.pt"
