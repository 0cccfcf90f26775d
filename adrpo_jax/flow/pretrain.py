"""Pre-training of the digits flow model (conditional flow matching) and of the reward classifier.

Both trainers are functional: one jitted, donated step over ``nnx.split`` parameter pytrees with optax Adam(W),
the whole (small) training split lives on the device and each step draws its batch with its own key
(``fold_in(seed key, step)``), so a run is deterministic given the seeds and the platform.

Flow model (docs/math.md, "Flow matching"): ``x0 ~ N(0, I)``, ``x1`` a data batch, ``t ~ U(0, 1)`` (or
logit-normal), ``x_t = (1 - t) x0 + t x1``, ``u_t = x1 - x0`` (:func:`adrpo_jax.losses.rectified_flow_path`),
loss ``mean_i ||v_theta(x_t, t, c) - u_t||^2`` (:func:`adrpo_jax.losses.cfm_loss`), the condition replaced by
the null class with probability ``class_dropout_prob`` (classifier-free guidance), optional EMA of the weights
(the returned model holds the EMA weights when ``ema_decay > 0``).

Caching: finished runs are saved under ``$ADRPO_JAX_CACHE`` (default ``~/.cache/adrpo_jax``)
``/flow_digits/<kind>-<hash of the config sections>`` and re-loaded instead of re-trained, so demos and
experiments pre-train once. Pass ``workdir`` to save elsewhere, ``use_cache=False`` to force training.
Switches that change memory or speed but not the numbers (``model.remat``) are not part of the hash: one
entry serves every value of them, and the loaded model takes the caller's value.

Configuration (:func:`default_config`, an ``ml_collections.ConfigDict``; the functions read these sections):

* ``data``: ``image_size`` (8; 16 upsamples), ``condition_mode`` (``"digit"`` | ``"digit_thickness"``),
  ``test_fraction`` (0.2), ``split_seed`` (0).
* ``model``: the fields of :class:`adrpo_jax.models.dit.DiTConfig`; ``num_classes`` None = from
  ``condition_mode``, ``image_size`` None = from ``data``.
* ``pretrain``: ``steps``, ``batch_size``, ``learning_rate`` (peak), ``warmup_steps``, ``weight_decay``,
  ``grad_clip`` (global norm; 0 = off), ``ema_decay`` (0 = off), ``time_sampling`` (``"uniform"`` |
  ``"logit_normal"``), ``seed``, ``log_every``.
* ``classifier``: ``channels``, ``features``, ``steps``, ``batch_size``, ``learning_rate``, ``weight_decay``,
  ``noise_std`` (Gaussian input-noise augmentation), ``seed``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from adrpo_jax.cache import cache_root
from adrpo_jax.flow.data import DigitsDataset, load_digits_splits, num_conditions
from adrpo_jax.flow.sampling import sample_noise
from adrpo_jax.losses import cfm_loss, flow_matching_error, rectified_flow_path
from adrpo_jax.models.classifier import ClassifierConfig, DigitClassifier, load_classifier, save_classifier
from adrpo_jax.models.dit import DiT, DiTConfig, cfg_drop_mask, count_params, load_dit, save_dit

__all__ = [
    "default_config",
    "dit_config_from",
    "classifier_config_from",
    "cache_root",
    "pretrain_flow_model",
    "train_classifier",
    "sample_time",
    "make_cfm_train_step",
    "cfm_eval_loss",
]

_CACHE_VERSION = 1  # bump when a change of the training code invalidates cached runs
_METRICS_FILE = "metrics.json"


def default_config() -> ml_collections.ConfigDict:
    """Defaults: a 0.33M-parameter DiT on 8x8 digits (hidden 64, depth 4, patch 2) and a 66k-parameter CNN.

    Chosen by a sweep: with 2000 steps of batch 64 at lr 2e-3 (about 3 minutes on 2 CPU cores) samples are
    classified as the prompted digit ~95% of the time (Heun, 10 steps, no guidance; 96-97% with batch 128);
    hidden 128 gains ~1 point at ~3x the CPU cost; 1000 steps lose ~15 points.
    """
    return ml_collections.ConfigDict({
        "data": {"image_size": 8, "condition_mode": "digit", "test_fraction": 0.2, "split_seed": 0},
        "model": {**DiTConfig().to_dict(), "image_size": None, "num_classes": None},
        "pretrain": {
            "steps": 2000, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 100, "weight_decay": 0.0,
            "grad_clip": 1.0, "ema_decay": 0.999, "time_sampling": "uniform", "seed": 0, "log_every": 200,
        },
        "classifier": {
            "channels": (32, 64, 64), "features": 128, "steps": 800, "batch_size": 128, "learning_rate": 2e-3,
            "weight_decay": 1e-4, "noise_std": 0.1, "seed": 0,
        },
    })


def _section(config: Any, name: str) -> dict[str, Any]:
    sec = config[name] if isinstance(config, (dict, ml_collections.ConfigDict)) and name in config else None
    if sec is None:
        raise ValueError(f"`config` has no section {name!r} (see adrpo_jax.flow.pretrain.default_config()).")
    return sec.to_dict() if isinstance(sec, ml_collections.ConfigDict) else dict(sec)


def _with_defaults(config: Any, name: str) -> dict[str, Any]:
    defaults = default_config()[name].to_dict()
    given = _section(config, name)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown keys {unknown} in config.{name}; valid keys are {sorted(defaults)}.")
    return {**defaults, **given}


def dit_config_from(config: Any) -> DiTConfig:
    """The :class:`DiTConfig` of a full config (``model`` + ``data`` sections, see the module docstring)."""
    data = _with_defaults(config, "data")
    model = _with_defaults(config, "model")
    if model["image_size"] is None:
        model["image_size"] = data["image_size"]
    if model["num_classes"] is None:
        model["num_classes"] = num_conditions(data["condition_mode"])
    if model["image_size"] != data["image_size"]:
        raise ValueError(f"config.model.image_size ({model['image_size']}) != config.data.image_size "
                         f"({data['image_size']}).")
    return DiTConfig.from_dict(model)


def classifier_config_from(config: Any) -> ClassifierConfig:
    """The :class:`ClassifierConfig` of a full config (``classifier`` + ``data`` sections)."""
    data = _with_defaults(config, "data")
    clf = _with_defaults(config, "classifier")
    return ClassifierConfig(image_size=data["image_size"], channels=tuple(clf["channels"]),
                            features=clf["features"])


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# DiTConfig fields that change memory / speed but not what the model computes: a cache entry serves every value
# of them. They enter the key with their default value, so that entries written before they were left out (with
# the default) keep their hash.
_NUMERICS_NEUTRAL_MODEL_KEYS = {"remat": False}
# Numerics-neutral switches added after entries were written: left out of the key (so those entries keep their
# hash), restored from this config on load. ``scan_layers``: the saved file holds the list layout either way.
_UNKEYED_MODEL_KEYS = ("scan_layers",)


def _model_cache_key(dit_cfg: DiTConfig) -> dict[str, Any]:
    """The ``model`` part of the pre-training cache key: the DiT config, with the numerics-neutral switches
    (``remat``) at their defaults and without ``scan_layers``."""
    key = {**dit_cfg.to_dict(), **_NUMERICS_NEUTRAL_MODEL_KEYS}
    for name in _UNKEYED_MODEL_KEYS:
        key.pop(name)
    return key


def _run_dir(kind: str, key: dict[str, Any], workdir: str | os.PathLike | None, use_cache: bool) -> str | None:
    if workdir is not None:
        return os.fspath(workdir)
    if not use_cache:
        return None
    return os.path.join(cache_root(), "flow_digits", f"{kind}-{_hash({**key, 'version': _CACHE_VERSION})}")


def _load_finished(directory: str | None, key_hash: str) -> dict[str, Any] | None:
    if directory is None:
        return None
    path = os.path.join(directory, _METRICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)
    return metrics if metrics.get("config_hash") == key_hash else None


def _write_metrics(directory: str, metrics: dict[str, Any]) -> None:
    tmp = os.path.join(directory, _METRICS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, os.path.join(directory, _METRICS_FILE))


def _make_optimizer(learning_rate: float, steps: int, warmup_steps: int, weight_decay: float,
                    grad_clip: float) -> optax.GradientTransformation:
    warmup = min(warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  end_value=0.1 * learning_rate)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
    parts.append(optax.adamw(schedule, weight_decay=weight_decay))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------------------
# Flow model
# ---------------------------------------------------------------------------------------------------------

def sample_time(key: jax.Array, n: int, time_sampling: str = "uniform") -> jax.Array:
    """``[n]`` training times in ``(0, 1)``: ``"uniform"`` or ``"logit_normal"`` (``sigmoid(N(0, 1))``, median
    sigma 0.5; SD3 fine-tuning shifts it, the SD3 recipe's ``rl.time_shift``: median sigma 0.75)."""
    if time_sampling == "uniform":
        return jax.random.uniform(key, (n,))
    if time_sampling == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (n,)))
    raise ValueError(f"`time_sampling` must be 'uniform' or 'logit_normal', got {time_sampling!r}.")


def make_cfm_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, batch_size: int,
                        class_dropout_prob: float, time_sampling: str = "uniform", ema_decay: float = 0.0,
                        unravel: Callable[[jax.Array], Any] | None = None) -> Callable:
    """Jitted, donated CFM pre-training step.

    ``step(params, opt_state, ema_params, images [N, H, W, C], cond [N], key, step) ->
    (params, opt_state, ema_params, metrics)``: draws ``batch_size`` examples (with replacement) from the
    on-device training set, then ``t``, ``x0`` and the CFG drop mask from ``key``. ``ema_params`` is ignored
    (returned as is) when ``ema_decay == 0``; else ``ema <- d ema + (1 - d) params`` with the warm-up
    ``d = min(ema_decay, (1 + step) / (10 + step))``.

    ``params`` is the ``nnx.Param`` state of ``graphdef``, or, with ``unravel`` (from
    ``jax.flatten_util.ravel_pytree``), one flat vector: the optimizer and EMA updates then compile to a few
    ops instead of a few per parameter leaf (the step compiles about twice as fast on XLA:CPU).
    """
    sample_time(jax.random.key(0), 1, time_sampling)  # validates the option eagerly
    to_state = unravel if unravel is not None else (lambda p: p)

    def loss_fn(params, x1, cond, key):
        k_t, k_x0, k_drop = jax.random.split(key, 3)
        n = x1.shape[0]
        t = sample_time(k_t, n, time_sampling)
        x0 = sample_noise(k_x0, x1.shape)
        x_t, u_t = rectified_flow_path(x0, x1, t)
        drop = cfg_drop_mask(k_drop, n, class_dropout_prob)
        v = nnx.merge(graphdef, to_state(params))(x_t, t, cond, drop_mask=drop)
        return cfm_loss(v, u_t)

    def train_step(params, opt_state, ema_params, images, cond, key, step):
        k_idx, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images[idx], cond[idx], k_loss)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema_decay > 0:
            d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, ema_params, metrics

    return jax.jit(train_step, donate_argnums=(0, 1, 2))


@functools.lru_cache(maxsize=8)
def _cfm_eval_fn(graphdef: nnx.GraphDef) -> Callable:
    @jax.jit
    def batch_loss(params, x1, c, key):
        k_t, k_x0 = jax.random.split(key)
        t = jax.random.uniform(k_t, (x1.shape[0],))
        x0 = sample_noise(k_x0, x1.shape)
        x_t, u_t = rectified_flow_path(x0, x1, t)
        v = nnx.merge(graphdef, params)(x_t, t, c)
        return jnp.sum(flow_matching_error(v, u_t))

    return batch_loss


def cfm_eval_loss(model: DiT, images: Any, cond: Any, *, seed: int = 0, num_repeats: int = 4,
                  batch_size: int = 512) -> float:
    """Conditional flow-matching loss of ``model`` on a data set (fixed keys; ``num_repeats`` draws of
    ``(t, x0)`` per image; no CFG dropout). A deterministic held-out metric."""
    graphdef, params = nnx.split(model)
    batch_loss = _cfm_eval_fn(graphdef)
    images = jnp.asarray(images, jnp.float32)
    cond = jnp.asarray(cond)
    total, count = 0.0, 0
    key = jax.random.key(seed)
    for r in range(num_repeats):
        for start in range(0, images.shape[0], batch_size):
            x1, c = images[start:start + batch_size], cond[start:start + batch_size]
            total += float(batch_loss(params, x1, c, jax.random.fold_in(key, r * 100003 + start)))
            count += x1.shape[0]
    return total / count


def pretrain_flow_model(config: Any = None, workdir: str | os.PathLike | None = None, *, use_cache: bool = True,
                        log_fn: Callable[[str], None] | None = print) -> tuple[DiT, dict[str, Any]]:
    """Pre-train the conditional DiT on digits by conditional flow matching (see the module docstring).

    Args:
      config: full config (``data``, ``model``, ``pretrain`` sections; missing keys take the defaults of
        :func:`default_config`). None = defaults.
      workdir: directory to save the model (``config.json``, ``params.safetensors``, ``metrics.json``); a
        finished run there with the same config is loaded instead of re-trained (unless ``use_cache=False``).
        None = the cache directory (see :func:`cache_root`), or nothing saved if ``use_cache=False``.
      use_cache: re-use a finished run with the same config.
      log_fn: progress logger (None = silent).

    Returns:
      ``(model, metrics)``; the model holds the EMA weights when ``ema_decay > 0``. ``metrics``:
      ``train_loss`` (mean of the last ``log_every`` steps), ``test_cfm_loss`` (:func:`cfm_eval_loss` on the
      test split), ``initial_test_cfm_loss``, ``steps``, ``train_time_s``, ``steps_per_s``, ``num_params``,
      ``loss_curve`` ([[step, loss], ...]), ``cached`` (True when loaded from disk), ``directory``.
    """
    config = default_config() if config is None else config
    dit_cfg = dit_config_from(config)
    data_cfg = _with_defaults(config, "data")
    pre = _with_defaults(config, "pretrain")
    key_dict = {"data": data_cfg, "model": _model_cache_key(dit_cfg),
                "pretrain": {k: v for k, v in pre.items() if k != "log_every"}}
    key_hash = _hash({**key_dict, "version": _CACHE_VERSION})
    directory = _run_dir("dit", key_dict, workdir, use_cache)
    if use_cache and directory is not None:  # (_load_finished finds nothing without a directory)
        finished = _load_finished(directory, key_hash)
        if finished is not None:
            if log_fn:
                log_fn(f"[pretrain] loading cached flow model from {directory}")
            # The switches left out of the key are this config's, not those of the run that filled the cache.
            model = load_dit(directory, **{k: getattr(dit_cfg, k)
                                           for k in (*_NUMERICS_NEUTRAL_MODEL_KEYS, *_UNKEYED_MODEL_KEYS)})
            return model, {**finished, "cached": True, "directory": directory}
    if pre["steps"] < 1 or pre["batch_size"] < 1:
        raise ValueError(f"config.pretrain.steps and batch_size must be >= 1, got {pre['steps']}, "
                         f"{pre['batch_size']}.")
    if not 0.0 <= pre["ema_decay"] < 1.0:
        raise ValueError(f"config.pretrain.ema_decay must be in [0, 1), got {pre['ema_decay']}.")

    train, test = load_digits_splits(data_cfg["image_size"], test_fraction=data_cfg["test_fraction"],
                                     seed=data_cfg["split_seed"])
    mode = data_cfg["condition_mode"]
    model = DiT(dit_cfg, rngs=nnx.Rngs(pre["seed"]))
    graphdef, state = nnx.split(model)
    params, unravel = ravel_pytree(state)
    initial_test = cfm_eval_loss(model, test.images, test.conditions(mode))
    tx = _make_optimizer(pre["learning_rate"], pre["steps"], pre["warmup_steps"], pre["weight_decay"],
                         pre["grad_clip"])
    opt_state = tx.init(params)
    ema = jnp.copy(params) if pre["ema_decay"] > 0 else jnp.zeros((0,), params.dtype)
    step_fn = make_cfm_train_step(graphdef, tx, batch_size=pre["batch_size"],
                                  class_dropout_prob=dit_cfg.class_dropout_prob,
                                  time_sampling=pre["time_sampling"], ema_decay=pre["ema_decay"],
                                  unravel=unravel)
    images = jnp.asarray(train.images)
    cond = jnp.asarray(train.conditions(mode))
    base_key = jax.random.key(pre["seed"] + 1)
    log_every = max(int(pre["log_every"]), 1)
    losses, curve = [], []
    t0 = time.perf_counter()
    compile_time = 0.0
    for step in range(pre["steps"]):
        params, opt_state, ema, m = step_fn(params, opt_state, ema, images, cond,
                                            jax.random.fold_in(base_key, step), jnp.asarray(step, jnp.float32))
        if step == 0:
            jax.block_until_ready(m["loss"])
            compile_time = time.perf_counter() - t0
        losses.append(m["loss"])
        if (step + 1) % log_every == 0 or step + 1 == pre["steps"]:
            window = float(jnp.mean(jnp.stack(losses[-log_every:])))
            curve.append([step + 1, window])
            if log_fn:
                log_fn(f"[pretrain] step {step + 1}/{pre['steps']} cfm_loss {window:.4f} "
                       f"({time.perf_counter() - t0:.1f}s)")
    jax.block_until_ready(params)
    train_time = time.perf_counter() - t0
    model = nnx.merge(graphdef, unravel(ema if pre["ema_decay"] > 0 else params))
    metrics = {
        "train_loss": curve[-1][1],
        "initial_test_cfm_loss": initial_test,
        "test_cfm_loss": cfm_eval_loss(model, test.images, test.conditions(mode)),
        "steps": pre["steps"],
        "train_time_s": train_time,
        "compile_time_s": compile_time,
        "steps_per_s": (pre["steps"] - 1) / max(train_time - compile_time, 1e-9),
        "num_params": count_params(model),
        "loss_curve": curve,
        "config_hash": key_hash,
    }
    if directory is not None:
        save_dit(model, directory)
        _write_metrics(directory, metrics)
    return model, {**metrics, "cached": False, "directory": directory}


# ---------------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------------

def _classifier_accuracy(model: DigitClassifier, data: DigitsDataset) -> dict[str, float]:
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(data.images))
    out = {"digit_accuracy": float(jnp.mean(jnp.argmax(logits["digit"], -1) == data.labels))}
    if "thickness" in logits:
        out["thickness_accuracy"] = float(jnp.mean(jnp.argmax(logits["thickness"], -1) == data.thickness))
    return out


def train_classifier(config: Any = None, workdir: str | os.PathLike | None = None, *, use_cache: bool = True,
                     log_fn: Callable[[str], None] | None = print) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train the digit/thickness classifier on the digits train split (cross-entropy summed over the heads,
    Gaussian input-noise augmentation ``noise_std``), evaluate on the test split.

    ``config``: ``data`` and ``classifier`` sections (see the module docstring); ``workdir``/``use_cache`` as in
    :func:`pretrain_flow_model`. Returns ``(classifier, metrics)`` with ``test_digit_accuracy``,
    ``test_thickness_accuracy``, ``train_digit_accuracy``, ``train_time_s``, ``num_params``, ``cached``.
    """
    config = default_config() if config is None else config
    data_cfg = _with_defaults(config, "data")
    ccfg = _with_defaults(config, "classifier")
    model_cfg = classifier_config_from(config)
    key_dict = {"data": {k: data_cfg[k] for k in ("image_size", "test_fraction", "split_seed")},
                "classifier": ccfg, "model": model_cfg.to_dict()}
    key_hash = _hash({**key_dict, "version": _CACHE_VERSION})
    directory = _run_dir("classifier", key_dict, workdir, use_cache)
    if use_cache and directory is not None:  # (_load_finished finds nothing without a directory)
        finished = _load_finished(directory, key_hash)
        if finished is not None:
            if log_fn:
                log_fn(f"[classifier] loading cached classifier from {directory}")
            return load_classifier(directory), {**finished, "cached": True, "directory": directory}
    train, test = load_digits_splits(data_cfg["image_size"], test_fraction=data_cfg["test_fraction"],
                                     seed=data_cfg["split_seed"])
    model = DigitClassifier(model_cfg, rngs=nnx.Rngs(ccfg["seed"]))
    graphdef, state = nnx.split(model)
    params, unravel = ravel_pytree(state)  # one flat vector: a much faster-compiling optimizer update
    tx = _make_optimizer(ccfg["learning_rate"], ccfg["steps"], min(50, ccfg["steps"] // 10),
                         ccfg["weight_decay"], 1.0)
    opt_state = tx.init(params)
    images, labels, thick = (jnp.asarray(a) for a in (train.images, train.labels, train.thickness))
    batch, noise_std = ccfg["batch_size"], float(ccfg["noise_std"])

    def loss_fn(params, x, y, k):
        logits = nnx.merge(graphdef, unravel(params))(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits["digit"], y).mean()
        if "thickness" in logits:
            loss = loss + optax.softmax_cross_entropy_with_integer_labels(logits["thickness"], k).mean()
        return loss

    def step_fn(params, opt_state, key):
        k_idx, k_noise = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch,), 0, images.shape[0])
        x = images[idx]
        if noise_std > 0:
            x = x + noise_std * sample_noise(k_noise, x.shape)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels[idx], thick[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step_fn = jax.jit(step_fn, donate_argnums=(0, 1))
    base_key = jax.random.key(ccfg["seed"] + 1)
    t0 = time.perf_counter()
    loss = None
    for step in range(ccfg["steps"]):
        params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(base_key, step))
    jax.block_until_ready(params)
    train_time = time.perf_counter() - t0
    model = nnx.merge(graphdef, unravel(params))
    test_acc = _classifier_accuracy(model, test)
    train_acc = _classifier_accuracy(model, train)
    metrics = {
        **{f"test_{k}": v for k, v in test_acc.items()},
        **{f"train_{k}": v for k, v in train_acc.items()},
        "final_loss": float(loss) if loss is not None else float("nan"),
        "train_time_s": train_time,
        "num_params": count_params(model),
        "config_hash": key_hash,
    }
    if log_fn:
        log_fn(f"[classifier] {ccfg['steps']} steps in {train_time:.1f}s: test digit acc "
               f"{test_acc['digit_accuracy']:.4f}, thickness acc "
               f"{test_acc.get('thickness_accuracy', float('nan')):.4f}")
    if directory is not None:
        save_classifier(model, directory)
        _write_metrics(directory, metrics)
    return model, {**metrics, "cached": False, "directory": directory}
