"""Demo helpers: config loading, run summaries and the reward/KL plot."""

from adrpo_jax.rl.demo import load_experiment_config, plot_runs, summarize_run


def _records(slope):
    recs = [{"step": 0, "eval/accuracy": 0.3}]
    recs += [{"step": s, "reward/exact_match_mean": 0.2 + slope * s, "kl_mean": 0.01 * s} for s in range(10, 60, 10)]
    recs[-1]["eval/accuracy"] = 0.5
    return recs


def test_summary_and_plot(tmp_path):
    s = summarize_run(_records(0.01), window=2)
    assert round(s["reward_start"], 6) == 0.35 and round(s["reward_end"], 6) == 0.65
    assert s["accuracy_start"] == 0.3 and s["accuracy_end"] == 0.5
    path = plot_runs({"GRPO": [_records(0.01), _records(0.012)], "ADRPO": [_records(0.02)]}, tmp_path / "p.png",
                     title="t")
    assert path.exists() and path.stat().st_size > 10_000
    assert load_experiment_config("llm_arith", "cpu_grpo").rl.adaptive is False
