"""Shared training infrastructure ("train kit") used by the LLM and flow-matching trainers.

Modules:
  config       common config sections, validation helpers (``ConfigError``), fingerprints
  programs     ``Program`` / ``ProgramSet``: jitted programs as values (jit for a run, lower + compile for a plan)
  sharding     mesh ('data', 'fsdp', 'tensor'), logical-axis rules, sharded init, host <-> global batches
  optim        ``make_optimizer(config.optim, total_steps)``
  step_utils   ``apply_updates_if_finite``, ``accumulate_gradients``, ``split_micro_batches``
  checkpoint   ``Checkpointer`` (orbax) with integrity fallback and ``CheckpointMismatchError``
  metrics      ``MetricWriter`` (JSONL / TensorBoard / W&B), ``ProgressBar``
  preemption   ``PreemptionGuard`` (SIGTERM/SIGINT -> checkpoint and exit 0)
  distributed  ``maybe_initialize_distributed``, ``setup_compilation_cache``
  parallel     ``batch_sharded_loss``: a library loss inside shard_map over the batch axes
  loop         ``run_training``: the shared restore/step/log/checkpoint/preempt driver

Public names are re-exported lazily (PEP 562), so ``import adrpo_jax.train.config`` (what experiment config
files do) does not import jax, flax or orbax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "CheckpointMismatchError": "checkpoint",
    "CheckpointRestoreError": "checkpoint",
    "Checkpointer": "checkpoint",
    "ConfigError": "config",
    "DEFAULT_LOGICAL_RULES": "sharding",
    "MESH_AXES": "sharding",
    "MetricWriter": "metrics",
    "NonFiniteUpdatesError": "loop",
    "PreemptionGuard": "preemption",
    "ProgressBar": "metrics",
    "TrainingResult": "loop",
    "accumulate_gradients": "step_utils",
    "add_common_config": "config",
    "apply_updates_if_finite": "step_utils",
    "batch_sharded_loss": "parallel",
    "batch_sharding": "sharding",
    "checkpointer_from_config": "loop",
    "common_config": "config",
    "config_diff": "config",
    "config_fingerprint": "config",
    "create_sharded": "sharding",
    "create_sharded_model": "sharding",
    "data_parallel_size": "sharding",
    "finalize_config": "config",
    "get_by_path": "config",
    "global_norm": "step_utils",
    "global_to_host_local": "sharding",
    "host_local_to_global": "sharding",
    "logical_to_named_sharding": "sharding",
    "logical_to_partition_spec": "sharding",
    "make_mesh": "sharding",
    "make_optimizer": "optim",
    "make_schedule": "optim",
    "masked_mean_std": "step_utils",
    "masked_min_max": "step_utils",
    "mix_params": "step_utils",
    "maybe_initialize_distributed": "distributed",
    "merge_defaults": "config",
    "plan_sharded": "sharding",
    "process_batch_slice": "sharding",
    "read_jsonl": "metrics",
    "reduce_update_metrics": "step_utils",
    "replicated_sharding": "sharding",
    "require_choice": "config",
    "require_divisible": "config",
    "require_float": "config",
    "require_float_or_inf": "config",
    "require_int": "config",
    "require_range": "config",
    "require_sections": "config",
    "require_type": "config",
    "rng_from_meta": "checkpoint",
    "rng_to_meta": "checkpoint",
    "run_training": "loop",
    "setup_compilation_cache": "distributed",
    "shard_like": "sharding",
    "shardings_of": "sharding",
    "split_micro_batches": "step_utils",
    "tree_is_finite": "step_utils",
    "validate_advantage_clip": "config",
    "validate_common_config": "config",
    "validate_lora_section": "config",
    "validate_ref_refresh": "config",
    "weight_decay_mask": "optim",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazy exports: names resolved by __getattr__)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"adrpo_jax.train.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adrpo_jax.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
