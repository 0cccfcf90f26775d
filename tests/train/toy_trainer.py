"""A tiny MLP regression trainer built on adrpo_jax.train: the reference for how trainers use the kit.

Functional NNX style (``nnx.split``/``nnx.merge`` inside ``jax.jit``), parameters with logical axis names,
state born sharded from ``plan_sharded``/``create_sharded``, batches assembled from each process's rows,
per-step randomness from ``fold_in(seed, step)``, a data iterator whose position is host state saved in the
checkpoint, non-finite updates skipped by ``apply_updates_if_finite``, optional gradient accumulation.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from adrpo_jax import train


class ToyMLP(nnx.Module):
    def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
        with nnx.use_eager_sharding(False):
            init = nnx.initializers.lecun_normal()
            self.hidden = nnx.Linear(features, hidden, rngs=rngs,
                                     kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                                     bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)))
            self.scale = nnx.Param(jnp.ones((hidden,)), sharding_names=("norm",))
            self.out = nnx.Linear(hidden, 1, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("mlp", None)),
                                  bias_init=nnx.with_partitioning(nnx.initializers.zeros, (None,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)) * self.scale[...])[:, 0]


class ToyData:
    """Fixed random regression set, reshuffled every epoch; yields this process's rows of each global batch."""

    def __init__(self, seed: int, size: int, features: int, global_batch: int, rows: slice):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(size, features)).astype(np.float32)
        w = rng.normal(size=(features,)).astype(np.float32)
        self.y = (np.sin(self.x @ w) + 0.1 * self.x[:, 0]).astype(np.float32)
        self.seed, self.size, self.global_batch, self.rows = seed, size, global_batch, rows
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self) -> dict[str, np.ndarray]:
        if self.position + self.global_batch > self.size:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order(self.epoch)[self.position:self.position + self.global_batch][self.rows]
        self.position += self.global_batch
        return {"x": self.x[idx], "y": self.y[idx]}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def train_and_evaluate(config, workdir: str) -> dict:
    toy = config.toy
    train.require_divisible(config, "toy.batch_size", "optim.grad_accum_steps")
    mesh = train.make_mesh(config.mesh)
    train.require_divisible(config, "toy.batch_size", train.data_parallel_size(mesh),
                            what=f"the data-parallel size {train.data_parallel_size(mesh)} (mesh.data * mesh.fsdp)")
    tx, schedule = train.make_optimizer(config.optim, config.total_steps)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ToyMLP(toy.features, toy.hidden, rngs=nnx.Rngs(0))))

    def init_state():
        model = ToyMLP(toy.features, toy.hidden, rngs=nnx.Rngs(config.seed))
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": tx.init(params)}

    abstract_state = train.plan_sharded(init_state, mesh)
    state_shardings = train.shardings_of(abstract_state)
    batch_sharding = train.batch_sharding(mesh)
    replicated = train.replicated_sharding(mesh)
    accum = config.optim.grad_accum_steps

    def loss_fn(params, batch, key, nan_scale, normalizer):
        pred = nnx.merge(graphdef, params)(batch["x"])
        target = batch["y"] + 0.01 * jax.random.normal(key, batch["y"].shape)
        return jnp.sum(jnp.square(pred - target)) / normalizer * nan_scale

    def step(state, batch, key, nan_scale):
        normalizer = batch["y"].shape[0]  # the *global* batch size: micro-batch sums add up to the full loss
        grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, b, key, nan_scale, normalizer))
        if accum > 1:
            loss, grads = train.accumulate_gradients(grad_fn, state["params"],
                                                     train.split_micro_batches(batch, accum))
        else:
            loss, grads = grad_fn(state["params"], batch)
        params, opt_state, info = train.apply_updates_if_finite(tx, grads, state["opt_state"], state["params"],
                                                                loss=loss)
        return {"params": params, "opt_state": opt_state}, {"loss": loss, "num_samples": normalizer, **info}

    step_jit = jax.jit(step, in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_jit = jax.jit(lambda params, batch: jnp.mean(jnp.square(nnx.merge(graphdef, params)(batch["x"]) - batch["y"])),
                       out_shardings=replicated)

    rows = train.process_batch_slice(toy.batch_size, mesh)
    data = ToyData(config.seed, toy.dataset_size, toy.features, toy.batch_size, rows)
    eval_batch = train.host_local_to_global({"x": data.x[:toy.batch_size][rows], "y": data.y[:toy.batch_size][rows]},
                                            mesh)
    base_key = jax.random.key(config.seed + 1)

    def train_step(step_index: int, state):
        if toy.step_sleep_s:
            time.sleep(toy.step_sleep_s)
        local = data.next()
        batch = train.host_local_to_global(local, mesh)
        if step_index == 0:  # each process reads back exactly the rows it fed
            assert np.array_equal(train.global_to_host_local(batch["x"]), local["x"])
        nan_scale = np.float32(np.nan if 0 <= toy.nan_from_step <= step_index else 1.0)
        key = jax.random.key_data(jax.random.fold_in(base_key, step_index))
        return step_jit(state, batch, jax.random.wrap_key_data(key), nan_scale)

    result = train.run_training(
        config=config, workdir=workdir, init_state=lambda: train.create_sharded(init_state, abstract_state),
        abstract_state=abstract_state, train_step=train_step, get_host_state=data.get_state,
        set_host_state=data.set_state, eval_step=lambda s, state: {"eval/loss": eval_jit(state["params"], eval_batch)},
        learning_rate_fn=schedule, throughput_keys=("num_samples",))

    if toy.save_final_params and not result.preempted:
        # Collective when params are split across processes: every process takes part, process 0 writes.
        flat = {jax.tree_util.keystr(path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(result.state["params"])[0]}
        host = multihost_utils.process_allgather(flat, tiled=True) if jax.process_count() > 1 else jax.device_get(flat)
        if jax.process_index() == 0:
            np.savez(os.path.join(workdir, "final_params.npz"), **{k: np.asarray(v) for k, v in host.items()})
    return result.to_dict()
