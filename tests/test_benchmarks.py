"""The checks of benchmarks/evaluate_suites.py, the script that runs every evaluate suite on a GPU (which CI has not):
each of them must be able to fail, since a GPU run is rare and its verdict is read, not re-derived."""

from __future__ import annotations

import copy

from benchmarks.evaluate_suites import compare, problems, side_loaded

SHARED_IN = "computed by this run and shared in /tmp/x/shared/a1"
LOADED = "loaded from /tmp/x/shared/a1 (computed by an earlier run of this pipeline)"


def suite_row(metrics: dict, shared: bool = False) -> dict:
    row = {"seconds": 1.0, "metrics": metrics, "tags": {}, "fell_back": {}, "all_finite": True}
    if shared:
        row.update(side_origins=[SHARED_IN, LOADED], side_read_back=True, side_read_back_exactly=True, side_read_back_differences=[])
    return row


def clean_run() -> dict:
    """One device's rows for tiny-gemma2, as a run where everything went right records them."""
    return {
        "core": suite_row({"core.mse": 0.1, "core.mse.bootstrap_se": 0.01}),
        "scr": suite_row({"scr.scr_metric_threshold_2": 0.2, "scr.scr_metric_threshold_2.bootstrap_se": 0.05}, shared=True),
        "tpp": suite_row({"tpp.tpp_threshold_2_total_metric": 0.3}, shared=True),
        "absorption": {"not_applicable": "its prompts run past the context"},
        "ravel": suite_row({"ravel.disentanglement_score": 0.2, "ravel.disentanglement_score.binomial_se": 0.02}),
    }


def test_a_clean_run_has_no_problem_and_each_failure_is_named():
    assert problems("tiny-gemma2", {"cuda": clean_run()}) == []
    cases = {
        "failed": lambda rows: rows.update(core={"error": "RuntimeError: boom"}),
        "not applicable, where it should apply": lambda rows: rows.update(ravel={"not_applicable": "no"}),
        "fell back (saecomp.scr.padding_masked_failed)": lambda rows: rows["scr"]["fell_back"].update(
            {"saecomp.scr.padding_masked_failed": "x"}
        ),
        "fell back (uncertainty.jackknife_skipped)": lambda rows: rows["core"]["fell_back"].update({"uncertainty.jackknife_skipped": "x"}),
        "a number is not finite": lambda rows: rows["core"].update(all_finite=False),
        "did not load the shared side": lambda rows: rows["tpp"].update(side_read_back=False),
        "the shared side gave other numbers": lambda rows: rows["tpp"].update(side_read_back_exactly=False),
    }
    for expected, damage in cases.items():
        rows = clean_run()
        damage(rows)
        found = problems("tiny-gemma2", {"cuda": rows})
        assert len(found) == 1 and expected in found[0], (expected, found)
    # RAVEL not applicable is expected on GPT-2 (tiny), not on Gemma-2 (tiny-gemma2)
    rows = clean_run()
    rows["ravel"] = {"not_applicable": "GPT2LMHeadModel"}
    assert problems("tiny", {"cpu": rows}) == [] and len(problems("tiny-gemma2", {"cpu": rows})) == 1


def test_the_second_sae_must_have_loaded_the_very_folder_the_first_shared():
    assert side_loaded(SHARED_IN, LOADED)
    assert not side_loaded(SHARED_IN, "computed by this run")  # computed its own: equal numbers prove nothing
    assert not side_loaded(SHARED_IN, "loaded from /tmp/x/shared/b2 (computed by an earlier run of this pipeline)")
    assert not side_loaded("computed by this run (not shared: it may take 9.0 GB and /tmp has 1.0 GB free)", LOADED)


def test_another_kind_of_standard_error_on_the_other_device_is_reported():
    cpu, gpu = clean_run(), clean_run()
    assert all(m["other_standard_error_kinds"] == [] for m in compare(cpu, gpu).values())
    moved = copy.deepcopy(gpu)
    metrics = moved["scr"]["metrics"]
    metrics["scr.scr_metric_threshold_2.binomial_se"] = metrics.pop("scr.scr_metric_threshold_2.bootstrap_se")
    metrics["scr.scr_metric_threshold_2"] = 0.25
    result = compare(cpu, moved)["scr"]
    assert result["other_standard_error_kinds"] == ["scr.scr_metric_threshold_2"]
    assert result["largest"] == "scr.scr_metric_threshold_2" and abs(result["largest_difference"] - 0.05) < 1e-12
