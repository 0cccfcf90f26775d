"""Issue 28 item 5, host side: the SD3 prompt table never sits whole in a process's host memory.

The embedding cache is opened memory-mapped (the current ``.npy`` layout and the ``.npz`` of earlier releases);
:func:`adrpo_jax.flow.sd3.shard_prompt_table` builds the sharded device table on 8 forced CPU devices from a
source that records every row range read and refuses to be converted whole: the device table equals the
in-memory one (the same float32 -> compute-dtype conversion: exact), each read is one shard's rows, a shard
replicated on several devices is read once, and the numpy allocations of the whole path (cache hit + placement,
``tracemalloc``) stay at about one shard, far below the table.
"""

import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow import text_embeddings as te
from adrpo_jax.flow.sd3 import MMDiTVelocity, prompt_table_sharding, shard_prompt_table
from adrpo_jax.models import mmdit

N, L, D, P = 13, 6, 8, 5        # 13 rows (12 prompts + the null row), padded to 16 = 2 x fsdp 8


def _table(n=N, length=L, d=D, p=P, key="k" * 64):
    rng = np.random.default_rng(0)
    prompts = tuple(f"prompt {i}" for i in range(n - 1)) + ("",)
    return te.PromptEmbeddings(prompts=prompts, embeddings=rng.normal(size=(n, length, d)).astype(np.float32),
                               pooled=rng.normal(size=(n, p)).astype(np.float32), null_id=n - 1, key=key)


def _write_legacy_npz(cache, table):
    """The single-file layout of earlier releases, exactly as their ``PromptEmbeddingCache.save`` wrote it."""
    cache.cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache.path_for(table.key), "wb") as f:
        np.savez(f, embeddings=table.embeddings, pooled=table.pooled, null_id=np.int64(table.null_id),
                 key=np.str_(table.key), prompts_json=np.str_(json.dumps(list(table.prompts))))


@pytest.mark.parametrize("layout", ["npy", "legacy_npz"])
def test_cache_hit_is_memory_mapped(tmp_path, layout):
    table = _table()
    cache = te.PromptEmbeddingCache(tmp_path)
    if layout == "npy":
        path = cache.save(table)
        assert sorted(p.name for p in path.iterdir()) == ["embeddings.npy", "meta.json", "pooled.npy"]
    else:
        _write_legacy_npz(cache, table)
    got = cache.load(table.key, table.prompts)
    assert got is not None and got.prompts == table.prompts and got.null_id == table.null_id
    for name in ("embeddings", "pooled"):
        arr = getattr(got, name)
        assert isinstance(arr, np.memmap) and arr.mode == "r", (name, type(arr))  # opened, not read
        assert not arr.flags.writeable
        np.testing.assert_array_equal(arr, getattr(table, name))
    assert cache.load(table.key, table.prompts[:-1]) is None  # other rows: a miss
    assert cache.load("x" * 64, table.prompts) is None


def test_compressed_or_broken_cache_files(tmp_path, caplog):
    table = _table()
    cache = te.PromptEmbeddingCache(tmp_path)
    cache.cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache.path_for(table.key), "wb") as f:  # not written by us, but readable: read whole (warned)
        np.savez_compressed(f, embeddings=table.embeddings, pooled=table.pooled, null_id=np.int64(table.null_id),
                            key=np.str_(table.key), prompts_json=np.str_(json.dumps(list(table.prompts))))
    got = cache.load(table.key, table.prompts)
    np.testing.assert_array_equal(got.embeddings, table.embeddings)
    assert "compressed" in caplog.text
    cache.path_for(table.key).write_bytes(b"PK\x03\x04 truncated")
    assert cache.load(table.key, table.prompts) is None
    path = cache.save(table)
    (path / "embeddings.npy").write_bytes(b"\x93NUMPY garbage")
    assert cache.load(table.key, table.prompts) is None  # the directory wins over the .npz; unreadable -> miss


class _RecordingRows:
    """A ``[n, ...]`` row source that records the row ranges read and refuses a whole-table conversion."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        assert isinstance(index, slice) and index.step is None, index
        self.reads.append((index.start, index.stop))
        return self.array[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole prompt table was converted to one host array")


@pytest.mark.parametrize("mesh_shape", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}],
                         ids=["fsdp8", "data2_fsdp4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_device_table_reads_only_shards_and_equals_the_host_table(mesh_shape, dtype):
    assert jax.device_count() == 8
    mesh = train.make_mesh(mesh_shape)
    table, rows = _table(), 16
    fsdp = mesh_shape["fsdp"]
    src = _RecordingRows(table.embeddings)
    emb = shard_prompt_table(src, rows, mesh, dtype, flatten=True)
    pooled = shard_prompt_table(_RecordingRows(table.pooled), rows, mesh, dtype)
    # the in-memory table of the old path: zero-padded, flattened, converted once
    want = np.zeros((rows, L * D), jnp.dtype(dtype))
    want[:N] = table.embeddings.reshape(N, -1)
    np.testing.assert_array_equal(np.asarray(emb), want)  # the same conversion: exact
    want_p = np.zeros((rows, P), jnp.dtype(dtype))
    want_p[:N] = table.pooled
    np.testing.assert_array_equal(np.asarray(pooled), want_p)
    assert emb.dtype == jnp.dtype(dtype) and emb.sharding == prompt_table_sharding((rows, L * D), mesh)
    assert emb.sharding.spec[0] == "fsdp"
    # every read is inside one shard, each shard read once although data=2 replicates it; padding rows not read
    shard = rows // fsdp
    assert all(b - a <= shard and a // shard == (b - 1) // shard for a, b in src.reads), src.reads
    assert sorted(src.reads) == sorted({(a, min(a + shard, N)) for a in range(0, N, shard)}), src.reads
    # the placed table is what the velocity module stores (no reshape copy, sharding kept)
    model = MMDiTVelocity(nnx.eval_shape(lambda: mmdit.MMDiT(mmdit.tiny_config(), rngs=nnx.Rngs(0))), emb, pooled,
                          null_id=N - 1, dtype=dtype, text_shape=(L, D))
    assert model.embeddings[...] is emb and model.text_shape == (L, D)
    # ... with the sharding the policy gives the frozen table (its device_put of the loaded model is then a no-op)
    abstract = nnx.eval_shape(lambda: MMDiTVelocity(mmdit.MMDiT(mmdit.tiny_config(), rngs=nnx.Rngs(0)),
                                                    jnp.zeros((rows, L, D), dtype), jnp.zeros((rows, P), dtype),
                                                    null_id=N - 1))
    frozen_shardings = train.logical_to_named_sharding(nnx.split(abstract, nnx.Param, ...)[2], mesh)
    for name, placed in (("embeddings", emb), ("pooled", pooled)):
        (sharding,) = jax.tree.leaves(frozen_shardings[name])
        assert jax.device_put(placed, sharding) is placed, (name, sharding, placed.sharding)


def test_cache_hit_and_placement_allocate_about_one_shard(tmp_path):
    """tracemalloc (numpy registers its buffers) over the cache hit + the placement of a 1 MiB float32 table in
    bfloat16 on fsdp=8: the transient host memory (the peak above what is still allocated at the end: on the CPU
    backend a device buffer may alias its numpy block, which then stays allocated as device memory) is about one
    bfloat16 shard (1/16 of the table). The old path read the whole float32 table, then built a whole bfloat16
    copy: 1.5x the table."""
    table = _table(n=64, length=32, d=128)
    table_bytes = table.embeddings.nbytes
    cache = te.PromptEmbeddingCache(tmp_path)
    cache.save(table)
    mesh = train.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    shard_prompt_table(table.embeddings[:8], 64, mesh, jnp.bfloat16, flatten=True)  # compile / warm-up outside
    tracemalloc.start()
    try:
        got = cache.load(table.key, table.prompts)
        emb = shard_prompt_table(got.embeddings, 64, mesh, jnp.bfloat16, flatten=True)
        jax.block_until_ready(emb)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - current < table_bytes / 4, (peak, current, table_bytes)
    np.testing.assert_array_equal(np.asarray(emb, np.float32),
                                  table.embeddings.reshape(64, -1).astype(jnp.bfloat16).astype(np.float32))


def test_export_gathers_the_transformer_not_the_table(monkeypatch):
    """SD3Trainer's export merges the policy on the host with a one-row stand-in for the prompt table (the
    table on every host would be 68 GB at 25k prompts in bfloat16); the transformer's weights are the policy's."""
    from types import SimpleNamespace

    from adrpo_jax.flow.sd3_trainer import SD3Trainer
    model = MMDiTVelocity(mmdit.MMDiT(mmdit.tiny_config(), rngs=nnx.Rngs(0)),
                          np.zeros((N, 7, 12), np.float32), np.zeros((N, 10), np.float32), null_id=N - 1)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    from adrpo_jax.recipe.policy import Policy
    policy = SimpleNamespace(graphdef=graphdef, lora=None, frozen=frozen)
    policy.merged = lambda *a, **k: Policy.merged(policy, *a, **k)
    fake = SimpleNamespace(frozen=frozen, policy=policy)
    gathered = []
    real_get = jax.device_get
    monkeypatch.setattr(jax, "device_get",
                        lambda tree: gathered.extend(np.shape(x) for x in jax.tree.leaves(tree)) or real_get(tree))
    merged = SD3Trainer._merged_on_host(fake, params)
    assert merged.embeddings[...].shape == (1, 7 * 12) and merged.pooled[...].shape == (1, 10)
    assert (N, 7 * 12) not in gathered and (N, 10) not in gathered, gathered
    want = nnx.state(model.transformer, nnx.Param)
    got = nnx.state(merged.transformer, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
def test_load_components_places_the_cached_table_sharded(tmp_path, monkeypatch):
    """load_components on the tiny SD3 (8 forced CPU devices, fsdp=8): the table comes from the memory-mapped
    cache and lands flattened, row-sharded over fsdp, equal to the cached rows (float32 cpu variant: exact),
    zero padding rows; no read of the cache spans more than one shard's rows."""
    import importlib.util
    from pathlib import Path

    from adrpo_jax.flow import sd3 as sd3_lib
    from adrpo_jax.flow.sd3_trainer import load_components
    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("sd3_adrpo", repo / "configs" / "sd3_adrpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("cpu")
    config.text.cache_dir = str(tmp_path / "cache")
    config.mesh.data, config.mesh.fsdp = 1, 8
    reads = []
    real = sd3_lib._row_block

    def recording(source, rows, index, shape, dtype):
        reads.append((type(source), index[0].indices(rows)[:2]))
        return real(source, rows, index, shape, dtype)

    monkeypatch.setattr(sd3_lib, "_row_block", recording)
    mesh = train.make_mesh(config.mesh)
    comp = load_components(config, mesh)
    cached = te.PromptEmbeddingCache(config.text.cache_dir)
    (key_dir,) = Path(config.text.cache_dir).glob("sd3_prompts_*")
    meta = json.loads((key_dir / "meta.json").read_text())
    stored = cached.load(meta["key"], meta["prompts"])
    n, text_shape = stored.num_prompts, tuple(stored.embeddings.shape[1:])
    emb = comp.embeddings
    assert isinstance(emb, jax.Array) and emb.sharding.spec[0] == "fsdp" and comp.text_shape == text_shape
    assert emb.shape[0] % 8 == 0 and emb.shape[0] >= n
    host = np.asarray(emb)
    np.testing.assert_array_equal(host[:n], np.asarray(stored.embeddings).reshape(n, -1))
    assert not host[n:].any()
    shard = emb.shape[0] // 8
    assert {t for t, _ in reads} == {np.memmap} and all(b - a == shard for _, (a, b) in reads), reads
