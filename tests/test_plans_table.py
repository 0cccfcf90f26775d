"""The README's "What fits where" table is rendered from the committed plan JSONs (benchmarks/plans/); every shipped
accelerator variant has a plan that fits, and every committed plan's verdict matches its figures."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLANS_DIR = REPO / "benchmarks" / "plans"


def _make_plans():
    spec = importlib.util.spec_from_file_location("make_plans", PLANS_DIR / "make_plans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_rendered_from_the_committed_plans():
    mp = _make_plans()
    readme = (REPO / "README.md").read_text()
    assert mp.readme_with_table(readme) == readme, "run: python benchmarks/plans/make_plans.py --table"
    assert (PLANS_DIR / "TABLE.md").read_text() == mp.table()


def test_every_shipped_accelerator_variant_has_a_plan_that_fits():
    mp = _make_plans()
    shipped = [name for name, config, *_ in mp.PLANS if "llm_pod" not in config]
    missing = [name for name in shipped if not (PLANS_DIR / f"{name}.json").exists()]
    assert not missing, f"no committed plan for {missing}: python benchmarks/plans/make_plans.py --only NAME"
    for name in shipped:
        assert json.loads((PLANS_DIR / f"{name}.json").read_text())["fits"], name
    # every committed plan (the pod recipes' too, which may honestly not fit): its verdict matches its figures
    for path in sorted(PLANS_DIR.glob("*.json")):
        report = json.loads(path.read_text())
        limit = (1 - report["margin"]) * report["capacity_gib"] + 1e-9
        peaks = [p["peak_gib"] for p in report["programs"] if p["peak_gib"] is not None]
        assert report["fits"] == (max(peaks) <= limit) == (report.get("exit_code", 0) == 0), path.name
