"""Config of the toy regression trainer used by the launch.py tests (tests/train/toy_trainer.py)."""

import ml_collections

from adrpo_jax.train.config import add_common_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = add_common_config(ml_collections.ConfigDict())
    config.trainer = "tests.train.toy_trainer:train_and_evaluate"
    config.seed = 0
    config.total_steps = 20
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint.every_steps = 5
    config.checkpoint.max_to_keep = 3
    config.optim.learning_rate = 3e-2
    config.optim.warmup_steps = 2
    config.optim.schedule = "constant"  # independent of total_steps: extending a run is bit-identical
    config.optim.weight_decay = 1e-2
    config.logging.progress_bar = False
    config.toy = ml_collections.ConfigDict({
        "features": 8,
        "hidden": 16,
        "batch_size": 16,
        "dataset_size": 96,       # 6 steps per epoch: the shuffled order rolls over within a run
        "nan_from_step": -1,      # >= 0: the loss is NaN from this step on (non-finite skip tests)
        "step_sleep_s": 0.0,      # host sleep per step (gives the SIGTERM test time to act)
        "save_final_params": True,
    })
    del variant  # a single variant
    return config
