"""The README's code example runs as printed, and the README names only commands and files that exist."""

import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_losses_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README lost its losses example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
    loss, metrics, grad = namespace["loss"], namespace["metrics"], namespace["grad"]
    assert np.isfinite(float(loss)) and grad.shape == (8, 16)
    assert 0.0 <= float(metrics["beta_eff_min"]) <= float(metrics["beta_eff_max"]) <= 0.08 + 1e-6
    # padding gets no gradient
    assert np.all(np.asarray(grad)[~np.asarray(namespace["mask"])] == 0)


def test_readme_paths_exist():
    for path in sorted(set(re.findall(r"`((?:scripts|configs|experiments|benchmarks|docs|tests|adrpo_jax)/[\w./-]+\.(?:py|sh|md))",
                                      README))):
        assert (REPO / path).exists(), path
    for cmd in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert cmd in README
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
