r"""Plans every shipped accelerator variant with the target's own compiler (``launch.py --mode=plan``) and writes
``benchmarks/plans/<name>.json`` plus the "What fits where" table (``benchmarks/plans/TABLE.md`` and the README's
block between the ``plans:begin`` / ``plans:end`` markers).

    python benchmarks/plans/make_plans.py                 # every plan below (hours on a loaded 2-core machine)
    python benchmarks/plans/make_plans.py --only qwen     # the plans whose name contains 'qwen'
    python benchmarks/plans/make_plans.py --table         # only re-render TABLE.md and README's table from the JSONs

Each plan is one process (``JAX_PLATFORMS=cpu``, libtpu's compiler; no TPU needed). A plan that does not fit exits
1; its JSON is still written (``"fits": false``) and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# (name, config, target, extra overrides)
PLANS = [
    ("llm_arith_tpu_v5e-8", "configs/llm_arith.py:tpu", "v5e:2x4", []),
    ("llm_gsm8k_default_v5e-8", "configs/llm_gsm8k.py", "v5e:2x4", ["--config.model.path=preset:qwen2.5-0.5b"]),
    ("flow_digits_tpu_v5e-8", "configs/flow_digits.py:tpu", "v5e:2x4", []),
    ("sd3_adrpo_tpu_v5e-8", "configs/sd3_adrpo.py:tpu", "v5e:2x4", []),
    ("audio_arith_tpu_v5e-8", "configs/audio_arith.py:tpu", "v5e:2x4", []),
    ("sd3_adrpo_tpu_1024_v5p-8", "configs/sd3_adrpo.py:tpu_1024", "v5p:2x2x2", []),
    # GPU variants: XLA's GPU compiler for one H100, deviceless (the CUDA plugin, no GPU)
    ("flow_digits_gpu_h100", "configs/flow_digits.py:gpu", "h100:1", []),
    ("sd3_adrpo_gpu_h100", "configs/sd3_adrpo.py:gpu", "h100:1", []),
    ("audio_arith_gpu_h100", "configs/audio_arith.py:gpu", "h100:1", []),
]
for model in ("qwen2.5-7b", "qwen3-8b"):
    for mode in ("lora", "full"):
        for length in ("1k", "4k"):
            for target, chip in (("v5p:2x2x2", "v5p-8"), ("v6e:2x4", "v6e-8")):
                slice_ = ",v6e" if chip == "v6e-8" else ""
                PLANS.append((f"qwen_{model}_{mode}_{length}_{chip}",
                              f"configs/llm_pod.py:{model},{mode},{length}{slice_}", target, []))
# the multi-host row: two hosts of a v5e-16 (16 GiB chips: full fine-tuning of an 8B at 4k does not fit there,
# update and decode alike at any micro-batch or prompt count; LoRA does)
PLANS.append(("qwen_qwen3-8b_lora_4k_v5e-16_multihost", "configs/llm_pod.py:qwen3-8b,lora,4k", "v5e:4x4", []))
for mode in ("lora", "full"):
    PLANS.append((f"moe_qwen3-30b-a3b_{mode}_1k_v5p-16", f"configs/llm_pod.py:qwen3-30b-a3b,{mode}", "v5p:2x2x4", []))
PLANS.append(("gemma_gemma-3-12b_lora_1k_v6e-8", "configs/llm_pod.py:gemma-3-12b,lora", "v6e:2x4", []))


def _code_version() -> str:
    """The commit the plan was made with (``<sha>+dirty`` when adrpo_jax/ or configs/ had uncommitted edits)."""
    git = ["git", "-C", str(REPO)]
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "adrpo_jax", "configs"], capture_output=True,
                           text=True).stdout.strip()
    return f"{sha}+dirty" if dirty else sha


def run_plan(name: str, config: str, target: str, extra: list[str]) -> dict:
    out = HERE / f"{name}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(REPO / "launch.py"), f"--config={REPO / config.split(':')[0]}"
           + (f":{config.split(':', 1)[1]}" if ":" in config else ""), f"--workdir=/tmp/adrpo_plans/{name}",
           "--mode=plan", f"--config.plan.target={target}", f"--config.plan.output={out}", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.time() - t0
    if not out.exists():
        raise RuntimeError(f"{name}: no plan written (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    report.update(name=name, command=" ".join(["python launch.py", f"--config={config}", "--mode=plan",
                                               f"--config.plan.target={target}", *extra]),
                  exit_code=proc.returncode, wall_s=seconds, commit=_code_version())
    if proc.returncode:
        report["error"] = proc.stderr.strip().splitlines()[-2:]
    out.write_text(json.dumps(report, indent=2))
    return report


def table(link_prefix: str = "") -> str:
    rows = ["| recipe (`configs/...`) | target | fits | largest program | its peak / chip | resident / chip | "
            "HBM / chip | predicted step | MFU | code |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, config, _, extra in PLANS:
        path = HERE / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        recipe = config.removeprefix("configs/") + "".join(f" `{e}`" for e in extra)
        # XLA:GPU without a device has no cost analysis: FLOPs from the jaxpr and bytes a floor, so the step time is
        # a lower bound and no MFU is claimed
        floor = any(p.get("cost_source") == "jaxpr" for p in r["programs"])
        ge = "≥ " if floor else ""
        mfu = "n/a (no cost analysis)" if floor else f"{100 * (r['predicted_mfu'] or 0):.1f} %"
        rows.append(f"| [{recipe}]({link_prefix}{name}.json) | {r['target']} ({r['num_devices']} chips) | "
                    f"{'yes' if r['fits'] else '**no**'} | "
                    f"{r['largest_program']} | {r['largest_peak_gib']:.2f} GiB | {r['resident_gib']:.2f} GiB | "
                    f"{r['capacity_gib']:.0f} GiB | {ge}{r['predicted_step_s']:.3g} s | {mfu} | "
                    f"{r.get('commit') or 'before 0cf6ec6'} |")
    return "\n".join(rows) + "\n"


README = REPO / "README.md"
BEGIN, END = "<!-- plans:begin (benchmarks/plans/make_plans.py --table) -->", "<!-- plans:end -->"


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the table between the plan markers replaced by :func:`table`."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md has no {BEGIN!r} ... {END!r} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table('benchmarks/plans/')}{END}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="plan names containing this string")
    ap.add_argument("--table", action="store_true", help="only re-render TABLE.md")
    args = ap.parse_args()
    if not args.table:
        for name, config, target, extra in PLANS:
            if args.only and args.only not in name:
                continue
            r = run_plan(name, config, target, extra)
            print(f"{name}: fits={r['fits']} largest={r['largest_program']} {r['largest_peak_gib']:.2f} GiB "
                  f"step={r['predicted_step_s']:.3g}s ({r['wall_s']:.0f} s to plan)", flush=True)
    (HERE / "TABLE.md").write_text(table())
    if args.table or not args.only:  # a partial run leaves the README alone
        README.write_text(readme_with_table(README.read_text()))
    print(table())


if __name__ == "__main__":
    main()
