"""Repository-wide pytest set-up.

Forces 8 host (CPU) devices *before* jax is imported anywhere, so that `shard_map` tests can run on a
single CPU machine, and keeps everything offline (no model hub).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# The TPU compiler (libtpu, plan-mode tests) takes a process lock; compiling for a topology needs no TPU, so several
# processes (pytest workers, a plan in another shell) may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The tests run on the CPU; with libtpu installed (the plan mode's TPU compiler), jax would otherwise probe for a
# TPU in every process. Compiling for a TPU topology does not need the TPU platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
