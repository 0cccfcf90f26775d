"""Compile-only device sets for tests: a TPU topology (libtpu's compiler) or an H100 (the CUDA plugin's deviceless
compiler), each skipping the test where its compiler is not installed."""
import pytest


def tpu_devices(name: str) -> list:
    """The devices of TPU topology ``name`` ('v5e:2x4', ...), or skip."""
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as err:  # pylint: disable=broad-except
        pytest.skip(f"no TPU compiler here: {err}")


def h100_devices(per_host: int = 1) -> list:
    """The devices of ``per_host`` H100s for a deviceless XLA:GPU compile, or skip."""
    try:
        from jax.experimental import topologies

        from adrpo_jax.recipe.plan import gpu_target_config
        return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config("h100"),
                                                 topology=f"1x1x{per_host}").devices)
    except Exception as err:  # pylint: disable=broad-except
        pytest.skip(f"no CUDA plugin here: {err}")


def tpu_compiler_available(name: str = "v5e:2x4") -> bool:
    """Whether libtpu's compiler can describe TPU topology ``name`` here."""
    try:
        from jax.experimental import topologies
        topologies.get_topology_desc(platform="tpu", topology_name=name)
        return True
    except Exception:  # pylint: disable=broad-except
        return False


requires_libtpu = pytest.mark.skipif(not tpu_compiler_available(),
                                     reason="libtpu (pip install 'jax[tpu]') is not installed")


def cuda_plugin_available() -> bool:
    """Whether the CUDA plugin can describe an H100 here (a deviceless XLA:GPU compile)."""
    try:
        from jax.experimental import topologies

        from adrpo_jax.recipe.plan import gpu_target_config
        topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config("h100"), topology="1x1x1")
        return True
    except Exception:  # pylint: disable=broad-except
        return False


requires_cuda_plugin = pytest.mark.skipif(not cuda_plugin_available(),
                                          reason="the CUDA plugin (jax-cuda12-plugin) is not installed")
