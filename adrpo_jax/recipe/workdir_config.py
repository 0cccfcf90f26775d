r"""A config file that reads a run's own config back: ``--config=<this file>:WORKDIR`` is ``WORKDIR/config.json``.

``launch.py --workdir=DIR --mode=eval`` without ``--config`` passes this file with ``DIR``, so a run is evaluated
with exactly the config it trained with (its data, its reward functions, its ``import_path``), and
``--config.key=value`` overrides still apply on top (``--config.eval.path=other.jsonl``). ``config.json`` is
written by the runner once a run's first step succeeded (:func:`adrpo_jax.recipe.runner.write_run_config`).

Imports no jax (the flags are parsed before any accelerator is touched).
"""

from __future__ import annotations

import json
import os

from adrpo_jax.train.config import ConfigError, config_from_dict

CONFIG_FILE = "config.json"


def get_config(workdir: str = ""):
    """The ConfigDict of ``workdir/config.json`` (JSON lists back to tuples); ConfigError when there is none."""
    if not workdir:
        raise ConfigError("workdir_config.py needs the run directory: --config=.../workdir_config.py:WORKDIR.")
    path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: a run writes it once its first step succeeded. Pass the run's "
                          "config with --config=path/to/config.py[:variant] (and its --config.* overrides).",
                          key="config", value=path) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}).", key="config", value=path) from None
    return config_from_dict(data)
