r"""The launcher of a checkout: the same as ``adrpo-jax`` and ``python -m adrpo_jax.launch`` (adrpo_jax/launch.py).

    python launch.py --config=configs/<experiment>.py[:variant] --workdir=DIR [--config.key=value ...]
    python launch.py --config=llm_arith:cpu --workdir=DIR         # a packaged config by name (adrpo_jax/configs/)
    python launch.py --workdir=DIR --mode=eval                   # newest checkpoint -> DIR/eval.jsonl (DIR's config)
    python launch.py --config=configs/llm_pod.py:qwen3-8b,full --workdir=DIR --mode=plan --config.plan.target=v6e:2x4
    python launch.py --mode=compare --workdir=OUT RUN_DIR [RUN_DIR ...]   # OUT/compare.png, OUT/compare.md

``--mode=train|eval|plan|compare`` or the same as a subcommand (``python launch.py eval --workdir=DIR``). Exit
codes: 0 on success and after a graceful preemption; 1 with a one-line message for flag, config, checkpoint and
non-finite errors; 75 when a process of a multi-process run was lost.
"""

from adrpo_jax.launch import main

if __name__ == "__main__":
    main()
