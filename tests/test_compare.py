"""compare: the paper's tables from the tracking store. A synthetic store (runs with known metrics, no compute) checks
that every table cell is the metric of the run it names, that a missing variant shows as a gap, and that the report's
LaTeX and HTML are well formed."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from entrypoints import compare as compare_step
from saecomp import compare
from saecomp.config import ACCELERATOR_TAG
from saecomp.tracking import collect_runs, experiment_id_for

EXPERIMENT = "compare-synthetic"
HOOKS = (("attn.hook_z", 2), ("hook_resid_post", 2))


CPU = {"device": "cpu", "dtype": "float32"}
CPU_TAGS = {ACCELERATOR_TAG: "Intel(R) Xeon(R) Processor"}
"""Where every evaluation here ran: runs that do not say where they ran are never compared (compare._runtime)."""


def _run(experiment_id: str, step: str, name: str, tags: dict, params: dict, metrics: dict, files: dict | None = None, tmp=None) -> str:
    client = mlflow.MlflowClient()
    if step == "evaluate":
        params, tags = {**CPU, **params}, {**CPU_TAGS, **tags}
    run = client.create_run(experiment_id, tags={"saecomp.step": step, "mlflow.runName": name, **tags})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    for filename, frame in (files or {}).items():
        path = tmp / filename
        frame.to_csv(path, index=False)
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(0.01)  # distinct start times: the newest run fills a cell
    return run.info.run_id


FRAC_ALIVE_ONLY_IN = {"pretrained": {0: 2, 3: 1, 7: 1}, "pruned25": {0: 2, 3: 1, 7: 1, 9: 1}, "trained": {1: 1, 2: 1, 5: 3}}
"""At hook_resid_post, each variant's latents alive through one of its 20 test documents alone (of 100 latents):
pruned25 shares the pretrained SAE's but one."""


def frac_alive_without_each(only_in: dict[int, int], alive: float, n: int = 20, d_sae: int = 100) -> list[float]:
    """frac_alive with each sequence deleted in turn (the delete-one jackknife's values)."""
    return [alive - only_in.get(i, 0) / d_sae for i in range(n)]


def jackknife_se(only_in: dict[int, int], n: int = 20) -> float:
    values = pd.Series(frac_alive_without_each(only_in, 0.0))
    return float(((n - 1) / n * ((values - values.mean()) ** 2).sum()) ** 0.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Evaluate runs for every (hook, variant) but pruned50 at hook_resid_post; one cell filled twice (older, newer);
    a prune_llm run and a prune_sae run per hook with their sweep tables."""
    tmp = tmp_path_factory.mktemp("compare")
    client = mlflow.MlflowClient()
    # one experiment per build: each xdist worker that runs tests of this module builds this fixture in the session's
    # one store, and two builds in one experiment would fill every cell twice
    name = f"{EXPERIMENT}-{uuid.uuid4().hex[:8]}"
    experiment_id = experiment_id_for(name)
    model = "tiny-gpt2+prune_llm:abc"
    _run(experiment_id, "prune_llm", "prune_llm · tiny-gpt2 wanda 50%", {}, {"model": "tiny-gpt2", "method": "wanda", "sparsity": "0.5",
         "nm": "unstructured"}, {"ce_loss_dense": 1.41, "ce_loss_pruned": 1.42, "sparsity_actual": 0.5})  # fmt: skip
    runs = {}
    for n, (hook, layer) in enumerate(HOOKS):
        sweep = pd.DataFrame({"sparsity": [0.25, 0.5, 0.9], "mse": [0.01, 0.02, 0.09]})
        _run(experiment_id, "prune_sae", f"prune_sae · {hook}", {"hook": hook, "layer": str(layer)},
             {"model": "tiny-gpt2", "pruned_model_run": "abc"}, {"validation.pretrained.mse": 0.009, "validation.trained.mse": 0.007},
             {"sweep.csv": sweep}, tmp)  # fmt: skip
        for v, variant in enumerate(compare.VARIANTS):
            if hook == "hook_resid_post" and variant == "pruned50":
                continue  # the gap
            core = ("kl_div_score", "ce_loss_score", "mse", "cossim", "explained_variance")
            metrics = {f"core.{m}": 0.5 + n / 10 + v / 100 for m in core}
            metrics["core.ce_loss_score.bootstrap_se"] = 0.01  # pruned25 is within it of pretrained, the others are not
            metrics.update({"core.frac_alive": 0.9 - v / 10, "core.frac_alive.bootstrap_se": 0.02})
            metrics["core.average_max_decoder_cosine_sim"] = 0.3
            metrics.update({f"scr.scr_{kind}_threshold_{k}": k / 1000 + v / 100 for k in (2, 20) for kind in ("metric", "dir1", "dir2")})
            metrics.update({f"scr.scr_metric_threshold_{k}_padding_masked": k / 1000 + v / 100 + 0.001 for k in (2, 20)})  # ours
            tags = {"hook": hook, "layer": str(layer), "variant": variant}
            if hook == "attn.hook_z":
                tags["saecomp.ravel.not_applicable"] = "RAVEL reads hook_resid_post"
            else:
                metrics.update({"ravel.cause_score": 0.6 + v / 100, "ravel.city.Country.cause_score": 0.7 + v / 100})
            params = {"suites": "core,scr,ravel", "base_model": model}
            # at hook_resid_post the runs also log their bootstrap replicates, over the same resamples: each variant's
            # replicates are the same hard/easy-text pattern (spread 0.04) shifted by its value
            pattern = [0.02 * ((i % 7) - 3) for i in range(50)]
            if hook == "hook_resid_post":
                metrics["core.ce_loss_score.bootstrap_se"] = float(pd.Series(pattern).std())
                # SCR's bootstrap of the test texts, as evaluate logs it now; the trained SAE's run is an older one, with
                # the parametric draws (binomial_se)
                metrics[f"scr.scr_metric_threshold_2.{'binomial_se' if variant == 'trained' else 'bootstrap_se'}"] = 0.05
                # frac_alive's jackknife (as evaluate logs it now): its 20 sequences, the latents alive through each alone
                del metrics["core.frac_alive.bootstrap_se"]
                metrics["core.frac_alive.jackknife_se"] = jackknife_se(FRAC_ALIVE_ONLY_IN[variant])
            runs[(hook, variant)] = _run(experiment_id, "evaluate", f"evaluate · {hook} · {variant}", tags, params, metrics)
            if hook == "hook_resid_post":
                value = metrics["core.ce_loss_score"]
                samples = {"ce_loss_score": [value + d for d in pattern]}
                boot = {"unit": "document", "sample_id": "same-texts", "seed": 0, "replicates": 50, "samples": samples}
                only_in = {str(i): c for i, c in FRAC_ALIVE_ONLY_IN[variant].items()}
                se = metrics["core.frac_alive.jackknife_se"]
                jackknife = {"se": se, "unit": "document", "n_units": 20, "d_sae": 100, "dies_without": only_in}
                boot["jackknife"] = {"frac_alive": jackknife}
                (tmp / variant).mkdir()
                (tmp / variant / "core.json").write_text(json.dumps(boot))
                client.log_artifact(runs[(hook, variant)], str(tmp / variant / "core.json"), "uncertainty")
                # SCR's replicates: the same resampled texts (the same pattern) where the sample id is the same; the
                # trained SAE's older run has the same id but the other kind, which never pairs; pruned25's replicate 7
                # has no value (a tie)
                value = metrics["scr.scr_metric_threshold_2"]
                samples = [value + 3 * d for d in pattern]
                if variant == "pruned25":
                    samples[7] = None
                sample_id = "same-texts"
                scr = {"sample_id": sample_id, "seed": 0, "replicates": 50, "samples": {"scr_metric_threshold_2": samples}}
                (tmp / variant / "scr.json").write_text(json.dumps(scr))
                client.log_artifact(runs[(hook, variant)], str(tmp / variant / "scr.json"), "uncertainty")
    # A newer run for one cell (core only, without kl_div_score): it wins mse; kl_div_score and SCR stay the older run's.
    tags = {"hook": "attn.hook_z", "layer": "2", "variant": "trained"}
    newer = _run(experiment_id, "evaluate", "evaluate · newer", tags, {"suites": "core", "base_model": model}, {"core.mse": 0.123})
    # Another pruned model, at layer 10, with a selected level of its own
    other = "tiny-gpt2+prune_llm:def"
    tags = {"hook": "hook_resid_post", "layer": "10", "variant": "pruned85"}
    params = {"suites": "core", "base_model": other}
    runs["other"] = _run(experiment_id, "evaluate", "evaluate · other", tags, params, {"core.mse": 0.5})
    sweep = pd.DataFrame({"sparsity": [0.5], "mse": [0.1]})
    _run(experiment_id, "prune_sae", "prune_sae · other", {"hook": "hook_resid_post", "layer": "10"},
         {"model": "tiny-gpt2", "pruned_model_run": "def"}, {}, {"sweep.csv": sweep}, tmp)  # fmt: skip
    return {"experiment": name, "experiment_id": experiment_id, "runs": runs, "newer": newer, "model": model, "other": other}


def test_every_cell_is_the_metric_of_the_run_it_names(store):
    cells = compare.cells(collect_runs([store["experiment_id"]]))
    client = mlflow.MlflowClient()
    ok = cells[cells["status"] == "ok"]
    assert len(ok) > 40
    for cell in ok.itertuples():
        metrics = client.get_run(cell.run_id).data.metrics
        suite = {spec.name: spec.suite for spec in compare.TABLES}.get(cell.table)
        name = f"{suite}.{cell.metric}" if suite else cell.metric  # llm_pruning: prune_llm's own metric names
        assert metrics[name] == cell.value, cell
    for cell in ok[ok["model"] == store["model"]].itertuples():  # the run of its own hook and variant, not another's
        expected = store["newer"] if (cell.hook, cell.variant, cell.metric) == ("blocks.2.attn.hook_z", "trained", "mse") else None
        assert cell.run_id == (expected or store["runs"][(cell.hook.split(".", 2)[2], cell.variant)]), cell
    newest = cells[(cells["hook"] == "blocks.2.attn.hook_z") & (cells["variant"] == "trained") & (cells["metric"] == "mse")]
    assert set(newest["run_id"]) == {store["newer"]} and set(newest["value"]) == {0.123} and set(newest["candidates"]) == {2}
    kl = cells[(cells["hook"] == "blocks.2.attn.hook_z") & (cells["variant"] == "trained") & (cells["metric"] == "kl_div_score")]
    assert set(kl["status"]) == {"ok"}
    assert set(kl["run_id"]) == {store["runs"][("attn.hook_z", "trained")]}  # the newest run that has the value
    scr = cells[(cells["table"] == "scr") & (cells["hook"] == "blocks.2.attn.hook_z") & (cells["variant"] == "trained")]
    assert set(scr["run_id"]) == {store["runs"][("attn.hook_z", "trained")]}  # the newer run did not run SCR
    for kind in ("scr_metric", "scr_dir1", "scr_dir2"):  # the appendix's three rows per k, each with k ascending
        rows = [m for m in scr["metric"] if m.startswith(f"{kind}_threshold_") and not m.endswith("_padding_masked")]
        assert rows and sorted(rows, key=lambda m: int(re.findall(r"\d+", m)[0])) == rows
    order = list(scr["metric"])  # our padding-masked twins: rows of their own, k ascending, after SAEBench's kind
    twins = [m for m in order if m.endswith("_padding_masked")]
    assert twins == ["scr_metric_threshold_2_padding_masked", "scr_metric_threshold_20_padding_masked"]
    assert order.index(twins[0]) == order.index("scr_metric_threshold_20") + 1


def test_per_latent_summaries_carry_their_bootstrap_and_the_weights_alone_say_they_have_no_sampling_error(store):
    cells = compare.cells(collect_runs([store["experiment_id"]]))
    core = cells[(cells["table"] == "core") & (cells["model"] == store["model"]) & (cells["status"] == "ok")]
    alive = core[core["metric"] == "frac_alive"]
    # runs before frac_alive had its jackknife logged a bootstrap; compare reads either, and says which
    older = alive[alive["hook"] != "blocks.2.hook_resid_post"]
    assert len(older) == 4 and set(older["se"]) == {0.02} and set(older["se_kind"]) == {compare.SE_KINDS["bootstrap_se"]}
    now = alive[alive["hook"] == "blocks.2.hook_resid_post"].set_index("variant")
    assert set(now["se_kind"]) == {compare.SE_KINDS["jackknife_se"]} and len(now) == 3
    # paired deletion by deletion: the difference's values with each of the same 20 sequences deleted, by hand
    for variant in ("pruned25", "trained"):
        ours = pd.Series(frac_alive_without_each(FRAC_ALIVE_ONLY_IN[variant], now.loc[variant, "value"]))
        theirs = pd.Series(frac_alive_without_each(FRAC_ALIVE_ONLY_IN["pretrained"], now.loc["pretrained", "value"]))
        moved = ours - theirs
        expected = float((19 / 20 * ((moved - moved.mean()) ** 2).sum()) ** 0.5)
        assert now.loc[variant, "paired"] is True and now.loc[variant, "difference_se"] == pytest.approx(expected, rel=1e-12)
    # pruned25's latents alive through one sequence are the pretrained SAE's but one: their shared ones cancel
    assert now.loc["pruned25", "difference_se"] < 0.5 * (now.loc["pruned25", "se"] ** 2 + now.loc["pretrained", "se"] ** 2) ** 0.5
    weights = core[core["metric"] == "average_max_decoder_cosine_sim"]
    assert len(weights) == 7 and weights["se"].isna().all()
    assert set(weights["note"]) == {"from the SAE's weights alone: no sampling error"}
    assert not alive["note"].str.contains("weights").any()


def test_models_stay_apart_layers_sort_as_numbers_and_a_selected_level_shows_where_it_exists(store):
    cells = compare.cells(collect_runs([store["experiment_id"]]))
    other = cells[cells["model"] == store["other"]]
    assert set(other["hook"]) == {"blocks.10.hook_resid_post"}
    assert "pruned85" not in set(cells[cells["model"] == store["model"]]["variant"])
    selected = other[(other["variant"] == "pruned85") & (other["metric"] == "mse") & (other["table"] == "table1")]
    assert list(selected["status"]) == ["ok"]  # its Table 1 cell
    mine = cells[(cells["model"] == store["model"]) & (cells["table"] == "table1")]
    assert list(dict.fromkeys(mine["hook"])) == ["blocks.2.attn.hook_z", "blocks.2.hook_resid_post"]
    assert compare.hook_order("blocks.10.hook_z") > compare.hook_order("blocks.2.hook_z")
    sweep = pd.DataFrame({"sparsity": [0.5], "mse": [0.1]})
    sweeps = {(store["model"], "blocks.2.hook_resid_post"): (sweep, {}), (store["other"], "blocks.10.hook_resid_post"): (sweep, {})}
    pngs = compare.figures(cells, sweeps)
    assert {name for name in pngs if name.startswith("figure1")} == {
        "figure1_reconstruction__tiny-gpt2+prune_llm_abc.png",
        "figure1_reconstruction__tiny-gpt2+prune_llm_def.png",
    }  # one per model, never one figure over two models


def test_a_missing_variant_shows_as_a_gap_never_filled(store):
    cells = compare.cells(collect_runs([store["experiment_id"]]))
    gap = cells[(cells["hook"] == "blocks.2.hook_resid_post") & (cells["variant"] == "pruned50")]
    assert len(gap) and set(gap["status"]) == {"missing"} and gap["value"].isna().all() and set(gap["run_id"]) == {""}
    table1 = compare.wide(cells[cells["table"] == "table1"])
    assert table1.loc[("blocks.2.hook_resid_post", "mse"), "pruned50"] != table1.loc[("blocks.2.hook_resid_post", "mse"), "pruned50"]  # NaN
    # the wide CSV says why a value is NaN, and carries each cell's standard error beside it
    assert table1.loc[("blocks.2.hook_resid_post", "mse"), "pruned50_status"] == "missing"
    ce = table1.loc[("blocks.2.attn.hook_z", "ce_loss_score")]
    assert ce["pruned25"] == pytest.approx(0.51) and ce["pruned25_se"] == 0.01 and ce["pruned25_status"] == "ok"
    ravel_wide = compare.wide(cells[(cells["table"] == "ravel") & (cells["model"] == store["model"])])
    assert set(ravel_wide.loc["blocks.2.attn.hook_z", "trained_status"]) == {"not applicable"}
    assert ravel_wide.loc["blocks.2.attn.hook_z", "trained"].isna().all() and ravel_wide["trained"].dtype == float
    assert compare.wide(cells[cells["table"] == "llm_pruning"]).index.names == ["pruning", "metric"]
    row = next(line for line in compare.markdown(cells).splitlines() if line.startswith("| blocks.2.hook_resid_post | mse |"))
    assert row.split("|")[1 + 2 + compare.VARIANTS.index("pruned50")].strip() == "—"
    ravel = cells[(cells["table"] == "ravel") & (cells["hook"] == "blocks.2.attn.hook_z") & (cells["variant"] == "pretrained")]
    assert set(ravel["status"]) == {"not applicable"} and set(ravel["note"]) == {"RAVEL reads hook_resid_post"}
    # per entity class and attribute: a row per metric the runs logged, n/a where RAVEL does not apply
    attributes = cells[(cells["table"] == "ravel_attributes") & (cells["model"] == store["model"])]
    assert set(attributes["metric"]) == {"city.Country.cause_score"}
    by_cell = attributes.set_index(["hook", "variant"])
    assert by_cell.loc[("blocks.2.hook_resid_post", "trained"), "value"] == pytest.approx(0.73)
    assert by_cell.loc[("blocks.2.attn.hook_z", "trained"), "status"] == "not applicable"


def test_differences_smaller_than_their_uncertainty_are_marked(store):
    cells = compare.cells(collect_runs([store["experiment_id"]]))
    row = cells[(cells["table"] == "table1") & (cells["hook"] == "blocks.2.attn.hook_z") & (cells["metric"] == "ce_loss_score")]
    by_variant = row.set_index("variant")
    assert by_variant["se"].tolist() == [0.01] * 4  # the se of the run the value comes from
    assert set(by_variant["se_kind"]) == {"bootstrap over test documents"}
    # 0.51 against 0.50 with 0.01 each: |0.01| < sqrt(2) * 0.01; 0.52 and 0.53 are not within it
    assert by_variant.loc["pruned25", "within_uncertainty"] is True
    assert by_variant.loc["pruned50", "within_uncertainty"] is False and by_variant.loc["trained", "within_uncertainty"] is False
    assert by_variant.loc["pretrained", "within_uncertainty"] is None  # the reference itself
    assert not by_variant["paired"].any()  # these runs logged no replicates: the conservative combination
    # where both runs logged replicates over the same resamples, the difference's standard error is paired: 0.51 against
    # 0.50 is within each one's 0.04 but the two move together, so the 0.01 is a finding
    resid = cells[(cells["table"] == "table1") & (cells["hook"] == "blocks.2.hook_resid_post") & (cells["metric"] == "ce_loss_score")]
    resid = resid[resid["model"] == store["model"]].set_index("variant")
    assert resid.loc["pruned25", "paired"] is True and resid.loc["pruned25", "difference_se"] == pytest.approx(0, abs=1e-9)
    assert resid.loc["pruned25", "within_uncertainty"] is False and resid.loc["trained", "within_uncertainty"] is False
    assert resid.loc["pruned25", "se"] > 0.03  # unpaired, sqrt(2) * 0.04 would have called it no finding
    mse = cells[(cells["table"] == "table1") & (cells["metric"] == "mse")]
    assert mse["se"].isna().all() and mse["within_uncertainty"].isna().all()  # no standard error: nothing is claimed
    # SCR: where the runs resampled the same texts (the same sample id and kind), the difference pairs over the
    # replicates both have (pruned25's replicate 7 has none); 0.01 against a shared 0.05 is then a finding. A parametric
    # run beside a bootstrap (trained): the conservative combination
    scr = cells[(cells["table"] == "scr") & (cells["model"] == store["model"]) & (cells["metric"] == "scr_metric_threshold_2")]
    scr = scr[scr["hook"] == "blocks.2.hook_resid_post"].set_index("variant")
    assert scr.loc["pruned25", "paired"] is True and scr.loc["pruned25", "difference_se"] == pytest.approx(0, abs=1e-9)
    assert scr.loc["pruned25", "within_uncertainty"] is False and scr.loc["pruned25", "se"] == 0.05
    assert scr.loc["trained", "paired"] is False and scr.loc["trained", "difference_se"] == pytest.approx(0.05 * 2**0.5)
    assert scr.loc["trained", "within_uncertainty"] is True  # 0.03 against 0.0707
    assert scr.loc["pruned25", "se_kind"] == "bootstrap over test texts"
    assert scr.loc["trained", "se_kind"] == "binomial draws per accuracy over test texts (conservative; tests not traced)"
    line = next(x for x in compare.markdown(cells).splitlines() if x.startswith("| blocks.2.attn.hook_z | ce_loss_score |"))
    shown = [c.strip() for c in line.split("|")[3:7]]
    assert shown == ["0.5000 ± 0.01", "0.5100 ± 0.01 ≈", "0.5200 ± 0.01", "0.5300 ± 0.01"]
    assert r"0.5100 $\pm$ 0.01 $\approx$" in compare.latex(cells)


def test_every_latex_row_has_the_cells_its_column_specification_declares(store):
    text = compare.latex(compare.cells(collect_runs([store["experiment_id"]])))
    tabulars = re.findall(r"\\begin\{tabular\}\{([lrc]+)\}(.*?)\\end\{tabular\}", text, flags=re.S)
    assert len(tabulars) >= 4
    for spec, body in tabulars:
        rows = [line for line in body.splitlines() if line.endswith(r"\\")]
        assert rows and all(len(re.split(r"(?<!\\)&", row)) == len(spec) for row in rows), spec
        assert all(re.search(r"(?<!\\)_", row) is None for row in rows)  # underscores escaped


def test_compare_step_logs_the_report_and_the_html_renders(store, small_experiment, tmp_path):
    config = yaml.safe_load(small_experiment.read_text())
    config["name"] = store["experiment"]
    experiment = tmp_path / "synthetic.yaml"
    experiment.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(compare_step.main, ["--experiment", str(experiment)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Table 1: SAEBench core reconstruction metrics" in result.output
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([store["experiment_id"]], "tags.`saecomp.step` = 'compare'", max_results=5)
    assert run.info.status == "FINISHED"
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report", dst_path=str(tmp_path))
    names = {p.name for p in Path(folder).iterdir()}
    assert {"report.html", "tables.md", "tables.tex", "cells.csv"} <= names
    assert any(n.startswith("figure1_reconstruction") for n in names) and any(n.startswith("figure3_scr") for n in names)
    cells = pd.read_csv(f"{folder}/cells.csv", keep_default_na=False)
    assert (cells.loc[cells["status"] == "ok", "run_id"] != "").all()  # every number names its run
    page = open(f"{folder}/report.html").read()
    assert store["newer"] in page and "newest of 2" in page and "class='missing'" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):  # .ci/run installs Chromium: CI must not pass without rendering
            pytest.fail("no Chromium in CI to render the report (.ci/run installs Debian's chromium)")
        pytest.skip("no Chromium here to render the report")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,1600",
                    f"file://{folder}/report.html"], check=True, capture_output=True, timeout=120)  # fmt: skip
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1200, 1600)
    assert pixels.getextrema()[0] < 100  # text drawn on the white page (a blank or failed page is all white)


def test_bad_selection_is_refused_before_any_run(store, small_experiment, tmp_path):
    config = yaml.safe_load(small_experiment.read_text())
    config["name"] = store["experiment"]
    experiment = tmp_path / "synthetic.yaml"
    experiment.write_text(yaml.safe_dump(config))
    before = len(mlflow.MlflowClient().search_runs([store["experiment_id"]], "tags.`saecomp.step` = 'compare'"))
    for args, message in (
        (["--pipeline_run", "0" * 32], "is not a run of"),
        (["--pipeline_run", store["newer"]], "is not a pipeline run (it is an evaluate run); valid: the id of a pipeline run"),
        (["--tag", "variant"], "tag='variant' is not valid; valid: name=value"),
        (["--tag", "variant=nothing-like-this"], "no finished prune_llm, prune_sae or evaluate run"),
    ):
        result = CliRunner().invoke(compare_step.main, ["--experiment", str(experiment), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert len(mlflow.MlflowClient().search_runs([store["experiment_id"]], "tags.`saecomp.step` = 'compare'")) == before


def test_a_suite_not_applicable_to_every_sae_keeps_its_table_and_says_why():
    """SCR's rows are named after the metrics runs logged; when every SAE was refused (one that is NaN at a zero input)
    no run logged any, and the table must still show each cell as not applicable with the reason, never vanish."""
    reason = "SAEBench's scr zeroes the activations at padded positions ... 'constant_norm_rescale' ..."
    records = [
        compare.RunRecord(f"r{i}", "evaluate", f"evaluate {i}", i, params={"suites": "core,scr", "base_model": "tiny-gpt2"},
                          metrics={"core.mse": 0.1 * (i + 1)}, tags={"hook": "hook_mlp_out", "layer": "1", "variant": variant,
                                                                     "saecomp.scr.not_applicable": reason})
        for i, variant in enumerate(["pretrained", "trained"])
    ]  # fmt: skip
    cells = compare.cells(records)
    scr = cells[cells["table"] == "scr"].set_index("variant")
    assert set(scr["metric"]) == {compare.EVERY_METRIC}
    assert scr.loc["pretrained", "status"] == scr.loc["trained", "status"] == "not applicable"
    assert scr.loc["trained", "note"] == reason and scr.loc["trained", "run_id"] == "r1"
    assert set(scr.loc[["pruned25", "pruned50"], "status"]) == {"missing"}  # no run: a gap, not a reason
    assert "scr" in compare.markdown(cells).lower() and compare.EVERY_METRIC in compare.markdown(cells)
    # a suite with numbers somewhere keeps its metric rows and shows n/a only where refused
    records.append(compare.RunRecord("r9", "evaluate", "evaluate 9", 9, params={"suites": "scr", "base_model": "tiny-gpt2"},
                                     metrics={"scr.scr_metric_threshold_2": 0.3}, tags={"hook": "hook_mlp_out", "layer": "1",
                                                                                         "variant": "pruned25"}))  # fmt: skip
    scr = compare.cells(records).query("table == 'scr'").set_index("variant")
    assert set(scr["metric"]) == {"scr_metric_threshold_2"} and scr.loc["trained", "status"] == "not applicable"


def test_gemma_table1_prints_beside_the_papers_published_numbers():
    paper = compare.paper_table1()
    assert len(paper) == 3 * 8 * 4 and set(paper["variant"]) == set(compare.VARIANTS)
    assert set(paper["metric"]) == set(compare.TABLES[0].metrics)  # the rows of our Table 1 are the paper's
    gemma = "google/gemma-2-2b+prune_llm:x"
    records = [
        compare.RunRecord("r12", "evaluate", "evaluate · 12", 1, params={"suites": "core", "base_model": gemma},
                          metrics={"core.mse": 0.5}, tags={"hook": "hook_mlp_out", "layer": "12", "variant": "pretrained"}),
        compare.RunRecord("r11", "evaluate", "evaluate · 11", 2, params={"suites": "core", "base_model": gemma},
                          metrics={"core.mse": 0.4}, tags={"hook": "hook_mlp_out", "layer": "11", "variant": "pretrained"}),
    ]  # fmt: skip
    cells = compare.cells(records)
    beside = cells[cells["table"] == "table1_vs_paper"].set_index(["hook", "metric", "variant"])
    assert set(beside.index.get_level_values("hook")) == {"blocks.12.hook_mlp_out"}  # the paper's layer only
    assert beside.loc[("blocks.12.hook_mlp_out", "mse", "pretrained: ours"), "value"] == 0.5
    assert beside.loc[("blocks.12.hook_mlp_out", "mse", "pretrained: paper"), "value"] == 0.546
    assert abs(beside.loc[("blocks.12.hook_mlp_out", "mse", "pretrained: ours - paper"), "value"] - (0.5 - 0.546)) < 1e-12
    assert beside.loc[("blocks.12.hook_mlp_out", "mse", "trained: ours"), "status"] == "missing"  # no run: a gap
    assert beside.loc[("blocks.12.hook_mlp_out", "mse", "trained: paper"), "value"] == 0.352  # the paper's number still shows
    header = next(line for line in compare.markdown(cells).splitlines() if line.startswith("| hook | metric | pretrained: ours"))
    assert "pretrained: paper | pretrained: ours - paper | pruned25: ours" in header
    # the paper's MLP pretrained column read another model (its own clean CE 5.056 against 3.125): said, not hidden
    assert set(compare.paper_columns_on_another_model()) == {("Table 1", "MLP", "pretrained"), ("Table 7", "MLP", "pretrained")}
    for column in ("pretrained: paper", "pretrained: ours - paper"):
        assert "5.056 against 3.125" in beside.loc[("blocks.12.hook_mlp_out", "mse", column), "note"]
    assert "like-for-like" not in beside.loc[("blocks.12.hook_mlp_out", "mse", "trained: paper"), "note"]
    assert "like-for-like" not in beside.loc[("blocks.12.hook_mlp_out", "mse", "pretrained: ours"), "note"]
    assert "Not like-for-like: the paper's pretrained column at blocks.12.hook_mlp_out" in compare.markdown(cells)
    shifted = compare.paper_numbers()
    clean_attention = (shifted["output"] == "Attention") & (shifted["metric"] == "ce_loss_without_sae")
    shifted.loc[clean_attention & (shifted["variant"] == "trained"), "value"] += 0.02
    assert ("Table 1", "Attention", "trained") in compare.paper_columns_on_another_model(shifted)  # not just a fixed list
    shifted.loc[clean_attention & (shifted["variant"] == "pruned50"), "value"] += 0.02  # two against two: no majority
    split = compare.paper_columns_on_another_model(shifted)
    assert all("disagree" in split[("Table 1", "Attention", variant)] for variant in compare.VARIANTS)
    tiny = compare.cells([compare.RunRecord("t", "evaluate", "e", 1, params={"suites": "core", "base_model": "tiny-gpt2"},
                                            metrics={"core.mse": 0.1}, tags={"hook": "hook_mlp_out", "layer": "12"})])  # fmt: skip
    assert "table1_vs_paper" not in set(tiny["table"])


def test_every_appendix_number_of_the_paper_sits_beside_one_of_our_cells():
    """The appendix's Tables 4-13 and its sparse-probing table, as transcribed: each number names a metric our tables
    hold (so it can print beside ours), the core tables repeat Table 1 exactly where they overlap, and a Gemma-2-2B run
    at layer 12 gets ours | paper | difference for every suite the paper prints."""
    paper = compare.paper_numbers()
    counts = paper.groupby("table").size().to_dict()
    assert counts == {"table1": 96, "absorption": 48, "core": 288, "scr": 168, "tpp": 168, "ravel_attributes": 144, "sparse_probing": 32}
    assert set(paper["variant"]) == set(compare.VARIANTS) and paper["value"].notna().all()
    specs = {spec.name: spec for spec in compare.TABLES}
    for row in paper.itertuples():
        spec = specs[row.table]
        assert row.metric in spec.metrics if spec.metrics else re.fullmatch(spec.pattern, row.metric), row
    core = paper[paper["table"] == "core"].set_index(["output", "metric", "variant"])["value"]
    table1 = paper[paper["table"] == "table1"].set_index(["output", "metric", "variant"])["value"]
    assert (core.loc[table1.index] == table1).all()  # Tables 6-8 print Table 1's cells again

    gemma = "google/gemma-2-2b+prune_llm:x"
    metrics = {"scr.scr_dir1_threshold_2": 0.3, "tpp.tpp_threshold_500_unintended_diff_only": 0.02,
               "absorption.std_dev_num_split_features": 0.5, "ravel.nobel_prize_winner.Country of Birth.cause_score": 0.6,
               "sparse_probing.sae_top_2_test_accuracy": 0.81, "core.l0": 80.0}  # fmt: skip
    suites = "core,absorption,scr,tpp,sparse_probing,ravel"
    record = compare.RunRecord("r", "evaluate", "evaluate · 12", 1, params={"suites": suites, "base_model": gemma},
                               metrics=metrics, tags={"hook": "hook_resid_post", "layer": "12", "variant": "pretrained"})  # fmt: skip
    cells = compare.cells([record]).set_index(["table", "metric", "variant"])
    for table, metric, published in (("scr", "scr_dir1_threshold_2", 0.286), ("tpp", "tpp_threshold_500_unintended_diff_only", 0.016),
                                      ("absorption", "std_dev_num_split_features", 0.368),
                                      ("ravel_attributes", "nobel_prize_winner.Country of Birth.cause_score", 0.6521),
                                      ("sparse_probing", "sae_top_2_test_accuracy", 0.802), ("core", "l0", 82.355)):  # fmt: skip
        ours = metrics[f"{compare.TABLES[[s.name for s in compare.TABLES].index(table)].suite}.{metric}"]
        beside = cells.loc[f"{table}_vs_paper"]
        assert beside.loc[(metric, "pretrained: ours"), "value"] == ours
        assert beside.loc[(metric, "pretrained: paper"), "value"] == published, table
        assert abs(beside.loc[(metric, "pretrained: ours - paper"), "value"] - (ours - published)) < 1e-12
        assert beside.loc[(metric, "pretrained: paper"), "note"].endswith("gemma-2-2b_appendix.csv)")
        assert beside.loc[(metric, "trained: ours"), "status"] == "missing"
    assert "explained_variance_centred" not in set(cells.loc["core_vs_paper"].index.get_level_values("metric"))  # ours alone
    text = compare.markdown(compare.cells([record]))
    assert "SCR per number of ablated latents k beside the paper's Table 9 and Table 10" in text


def test_runs_with_several_seeds_fill_a_cell_with_their_mean_and_its_standard_error():
    """Several evaluation seeds of one suite that reads the seed: the newest run per seed, their mean, the standard
    error over seeds, every run named (and listed as a source). Core reads no seed: its newest run still wins."""
    model = "tiny-gpt2+prune_llm:x"

    def run(run_id, start, seed, scr, mse, variant="pretrained", train_size="200"):
        params = {"suites": "core,scr", "base_model": model, "evaluation.seed": seed, "evaluation.scr_tpp_train_size": train_size, **CPU}
        return compare.RunRecord(run_id, "evaluate", f"evaluate {run_id}", start, params=params,
                                 metrics={"scr.scr_metric_threshold_2": scr, "core.mse": mse},
                                 tags={"hook": "hook_resid_post", "layer": "2", "variant": variant, **CPU_TAGS})  # fmt: skip

    records = [run("old1", 1, "1", 0.9, 0.5), run("new1", 2, "1", 0.10, 0.4), run("s2", 3, "2", 0.20, 0.3),
               run("other", 3.5, "3", 0.9, 0.3, train_size="100"),  # another measurement: never averaged in
               run("s42", 4, "42", 0.30, 0.2),
               run("t", 5, "42", 0.25, 0.2, variant="trained")]  # fmt: skip
    cells = compare.cells(records).set_index(["table", "metric", "variant"])
    scr = cells.loc[("scr", "scr_metric_threshold_2", "pretrained")]
    assert abs(scr["value"] - 0.2) < 1e-12  # (0.10 + 0.20 + 0.30) / 3: the old run of seed 1 is replaced by its newer one
    assert abs(scr["se"] - 0.1 / 3**0.5) < 1e-12  # standard deviation 0.1 over 3 seeds
    assert scr["run_id"] == "new1,s2,s42" and "3 seeds (1, 2, 42)" in scr["note"] and scr["candidates"] == 5
    assert scr["se_kind"] == "spread over seeds"
    trained = cells.loc[("scr", "scr_metric_threshold_2", "trained")]
    assert trained["value"] == 0.25 and trained["within_uncertainty"] is None  # one seed: no uncertainty to compare with
    mse = cells.loc[("table1", "mse", "pretrained")]
    assert mse["value"] == 0.2 and mse["run_id"] == "s42" and pd.isna(mse["se"])  # core: the newest run, no spread
    report = compare.html_report(compare.cells(records), {}, "t", [])
    sources = report.split("<h2>Sources</h2>")[1]
    assert all(f"<code>{r}</code>" in sources for r in ("new1", "s2", "s42", "t")) and "<code>old1</code>" not in sources
    assert "<code>other</code>" not in sources


def test_sparse_probing_cells_carry_their_binomial_standard_errors_and_a_seed_spread_replaces_them():
    """evaluate logs sparse probing's accuracies with ``<metric>.binomial_se``: the cell carries it, says what it is
    over, and marks a difference within it; where several seeds ran, their spread is the cell's uncertainty instead."""
    model = "tiny-gpt2+prune_llm:x"

    def run(run_id, start, variant, accuracy, se, seed="42"):
        metrics = {"sparse_probing.sae_top_1_test_accuracy": accuracy, "sparse_probing.llm_test_accuracy": 0.9}
        if se is not None:
            metrics["sparse_probing.sae_top_1_test_accuracy.binomial_se"] = se
        params = {"suites": "sparse_probing", "base_model": model, "evaluation.seed": seed, **CPU}
        return compare.RunRecord(run_id, "evaluate", f"evaluate {run_id}", start, params=params, metrics=metrics,
                                 tags={"hook": "hook_resid_post", "layer": "2", "variant": variant, **CPU_TAGS})  # fmt: skip

    records = [run("p", 1, "pretrained", 0.80, 0.01), run("a", 2, "pruned25", 0.81, 0.01), run("b", 3, "pruned50", 0.70, 0.01)]
    cells = compare.cells(records).set_index(["table", "metric", "variant"])
    top1 = cells.loc["sparse_probing"].loc["sae_top_1_test_accuracy"]
    untraced = "binomial over the test texts of each class (tests not traced)"
    assert top1["se"].dropna().tolist() == [0.01, 0.01, 0.01] and set(top1["se_kind"].dropna()) == {untraced}
    assert top1.loc["pruned25", "within_uncertainty"] is True and top1.loc["pruned50", "within_uncertainty"] is False
    assert top1.loc["pruned25", "paired"] is False  # no replicates: the conservative sqrt(se_a^2 + se_b^2)
    llm = cells.loc[("sparse_probing", "llm_test_accuracy", "pretrained")]
    assert pd.isna(llm["se"]) and llm["se_kind"] is None  # a number logged without its standard error claims none
    line = next(x for x in compare.markdown(compare.cells(records)).splitlines() if "| sae_top_1_test_accuracy |" in x)
    assert [c.strip() for c in line.split("|")[3:6]] == ["0.8000 ± 0.01", "0.8100 ± 0.01 ≈", "0.7000 ± 0.01"]
    assert f"± one standard error, {untraced}" in compare.html_report(compare.cells(records), {}, "t", [])
    # two seeds of the pretrained SAE: their mean and the spread over seeds, not one run's binomial error
    replicated = compare.cells([*records, run("p2", 4, "pretrained", 0.84, 0.01, seed="1")]).set_index(["table", "metric", "variant"])
    cell = replicated.loc[("sparse_probing", "sae_top_1_test_accuracy", "pretrained")]
    assert cell["value"] == pytest.approx(0.82) and cell["se"] == pytest.approx(0.02) and cell["se_kind"] == "spread over seeds"


def test_sparse_probing_bootstraps_over_the_same_texts_pair_and_others_do_not():
    """Two SAEs whose sparse probing resampled the same test texts (the same ``sample_id``) differ replicate by replicate:
    a difference far smaller than either error is a finding when the replicates move together; over other texts it is
    not paired."""
    import numpy as np

    model, metric = "tiny-gpt2+prune_llm:x", "sae_top_1_test_accuracy"
    shared = np.random.default_rng(0).normal(0.8, 0.03, 1000)  # which texts were drawn moves both SAEs alike

    def run(run_id, start, variant, shift, sample_id):
        values = shared + shift + np.random.default_rng(start).normal(0, 0.001, 1000)
        metrics = {f"sparse_probing.{metric}": 0.8 + shift, f"sparse_probing.{metric}.bootstrap_se": float(values.std(ddof=1))}
        boot = {"sparse_probing": {"sample_id": sample_id, "seed": 0, "replicates": 1000, "samples": {metric: values.tolist()}}}
        params = {"suites": "sparse_probing", "base_model": model, "evaluation.seed": "42", **CPU}
        tags = {"hook": "hook_resid_post", "layer": "2", "variant": variant, **CPU_TAGS}
        return compare.RunRecord(run_id, "evaluate", run_id, start, params=params, metrics=metrics, tags=tags, bootstrap=boot)

    cells = compare.cells([run("p", 1, "pretrained", 0.0, "texts-1"), run("a", 2, "pruned25", 0.01, "texts-1"),
                           run("b", 3, "pruned50", 0.01, "texts-2")]).set_index(["table", "metric", "variant"])  # fmt: skip
    top1 = cells.loc["sparse_probing"].loc[metric]
    assert set(top1["se_kind"].dropna()) == {"bootstrap over test texts"}
    assert top1.loc["pruned25", "paired"] is True and top1.loc["pruned25", "within_uncertainty"] is False
    assert top1.loc["pruned25", "difference_se"] < 0.1 * top1.loc["pruned25", "se"]
    assert top1.loc["pruned50", "paired"] is False and top1.loc["pruned50", "within_uncertainty"] is True
    # ... and the cell says why: its SAE read other texts (as a trained SAE with another BOS setting reads other windows)
    assert "read other test texts than the pretrained SAE (sample_id texts-2 against texts-1)" in top1.loc["pruned50", "note"]
    assert "other test texts" not in (top1.loc["pruned25", "note"] or "")
    # a traced bootstrap and a parametric fallback never share a sample_id, whatever texts they read: no such note
    runtime = ("cpu", "float32", CPU_TAGS[ACCELERATOR_TAG])
    kinds = {"pretrained": ("texts", "bootstrap_se", 42, 1000), "pruned25": ("draws", "binomial_se", 42, 1000)}
    rows = [{"table": "scr", "model": model, "hook": "h", "metric": "m", "variant": variant, "value": 0.5, "se": 0.1, "note": "",
             "status": "ok", "_replicates": None, "_resamples": resamples, "_runtime": runtime}
            for variant, resamples in kinds.items()]  # fmt: skip
    compare._mark_within_uncertainty(rows)
    assert rows[1]["paired"] is False and "other test texts" not in rows[1]["note"]


def test_a_difference_between_evaluations_on_other_devices_is_never_marked_and_seeds_never_mix_devices():
    """TPP at many ablated latents and RAVEL move between a CPU and a GPU by more than their standard errors (which cover
    the test texts only; benchmarks/README.md): a variant evaluated on another device or dtype than the pretrained SAE
    gets no within-uncertainty mark, paired or not, and its note says why; runs of other seeds average only with runs
    on the same device, dtype and processor (an H100 is not an H200), and the cell's note names the seeds left out.
    Older runs that logged no device or dtype may have run anywhere: never marked, never averaged with others."""
    model, metric = "tiny-gpt2+prune_llm:x", "tpp_threshold_500_total_metric"

    def run(run_id, start, variant, value, device="cpu", dtype="float32", seed="42", processor=None):
        params = {"suites": "tpp", "base_model": model, "evaluation.seed": seed, "device": device, "dtype": dtype}
        metrics = {f"tpp.{metric}": value, f"tpp.{metric}.bootstrap_se": 0.01}
        processor = processor or ("NVIDIA H200" if device.startswith("cuda") else "Intel(R) Xeon(R) Processor")
        tags = {"hook": "hook_resid_post", "layer": "2", "variant": variant, ACCELERATOR_TAG: processor}
        return compare.RunRecord(run_id, "evaluate", run_id, start, params=params, metrics=metrics, tags=tags)

    def tpp_cells(records):
        return compare.cells(records).set_index(["table", "metric", "variant"]).loc["tpp"].loc[metric]

    same = tpp_cells([run("p", 1, "pretrained", 0.33), run("a", 2, "pruned25", 0.34), run("b", 3, "pruned50", 0.40)])
    assert same.loc["pruned25", "within_uncertainty"] is True and same.loc["pruned50", "within_uncertainty"] is False
    mixed = tpp_cells([run("p", 1, "pretrained", 0.33), run("a", 2, "pruned25", 0.34, device="cuda"),
                       run("b", 3, "pruned50", 0.40, dtype="bfloat16")])  # fmt: skip
    for variant, where in (("pruned25", "cuda/float32 (NVIDIA H200)"), ("pruned50", "cpu/bfloat16 (Intel(R) Xeon(R) Processor)")):
        cell = mixed.loc[variant]
        assert cell["within_uncertainty"] is None and cell["difference_se"] is None and cell["paired"] is None
        assert f"evaluated on {where}, the pretrained SAE on cpu/float32 (Intel(R) Xeon(R) Processor)" in cell["note"]
    # one kind of device, dtype and GPU: marked (cuda:0 is cuda); another GPU model: not
    gpus = tpp_cells([run("p", 1, "pretrained", 0.33, device="cuda"), run("a", 2, "pruned25", 0.34, device="cuda:0"),
                      run("b", 3, "pruned50", 0.34, device="cuda", processor="NVIDIA H100 80GB HBM3")])  # fmt: skip
    assert gpus.loc["pruned25", "within_uncertainty"] is True
    assert gpus.loc["pruned50", "within_uncertainty"] is None and "NVIDIA H100 80GB HBM3" in gpus.loc["pruned50", "note"]
    table = compare.markdown(compare.cells([run("p", 1, "pretrained", 0.33), run("a", 2, "pruned25", 0.34, device="cuda")]))
    line = next(x for x in table.splitlines() if f"| {metric} |" in x)
    assert [c.strip() for c in line.split("|")[3:5]] == ["0.3300 ± 0.01", "0.3400 ± 0.01"]  # no ≈ on the GPU's cell
    # seeds: the GPU's seed-1 run is another measurement, so the CPU's two seeds alone make the mean
    seeded = tpp_cells([run("p", 1, "pretrained", 0.30), run("p1", 2, "pretrained", 0.32, seed="1"),
                        run("g2", 3, "pretrained", 0.90, device="cuda", seed="2")])  # fmt: skip
    assert seeded.loc["pretrained", "value"] == 0.90 and seeded.loc["pretrained", "run_id"] == "g2"  # the newest run, alone
    seeded = tpp_cells([run("g2", 1, "pretrained", 0.90, device="cuda", seed="2"), run("p", 2, "pretrained", 0.30),
                        run("p1", 3, "pretrained", 0.32, seed="1")])  # fmt: skip
    assert seeded.loc["pretrained", "value"] == pytest.approx(0.31) and seeded.loc["pretrained", "run_id"] == "p1,p"  # by seed: 1, 42
    assert "seed 2 left out: evaluated on cuda/float32 (NVIDIA H200), this cell on cpu/float32" in seeded.loc["pretrained", "note"]
    # older runs without the params may have run anywhere: no mark, and no mean over seeds
    old = [
        dataclasses.replace(r, params={k: v for k, v in r.params.items() if k not in ("device", "dtype")})
        for r in (run("p", 1, "pretrained", 0.33), run("p1", 2, "pretrained", 0.35, seed="1"), run("a", 3, "pruned25", 0.34))
    ]
    unknown = tpp_cells(old)
    assert unknown.loc["pruned25", "within_uncertainty"] is None and "evaluated on an unrecorded device" in unknown.loc["pruned25", "note"]
    assert unknown.loc["pretrained", "value"] == 0.35 and unknown.loc["pretrained", "run_id"] == "p1"  # the newest, alone


def test_a_selection_by_variant_expects_that_variant_alone(store):
    """`compare --tag variant=pruned25` leaves the other variants out on purpose: their cells are not expected, so
    they are not reported missing; a pruned25 cell that no run fills still is."""
    selected = collect_runs([store["experiment_id"]], None, {"variant": "pruned25"})
    cells = compare.cells(selected, variants=["pruned25"])
    mine = cells[cells["model"] == store["model"]]
    assert set(mine["variant"]) == {"pruned25"} and (mine["status"] == "ok").any()
    everything = compare.cells(selected)  # without the selection's variants: the paper's four expected
    assert {"pretrained", "pruned50", "trained"} <= set(everything[everything["status"] == "missing"]["variant"])


def test_a_jackknife_never_pairs_with_a_bootstrap_and_a_nan_error_claims_nothing():
    """An older run's frac_alive (bootstrap replicates) beside a newer run's (jackknife): not the same resamples, so
    the conservative sqrt(se_a^2 + se_b^2); a NaN standard error says nothing rather than marking a finding."""
    base = {"table": "core", "model": "m", "hook": "h", "metric": "frac_alive", "status": "ok", "_runtime": ("cpu", "float32", "x")}
    jackknife = {"n_sequences": 20, "d_sae": 100, "dies_without": {"3": 1}}
    rows = [
        {**base, "variant": "pretrained", "value": 0.9, "se": 0.02, "_replicates": [0.9, 0.88, 0.91],
         "_resamples": ("texts", "bootstrap_se", 0, 3)},
        {**base, "variant": "pruned25", "value": 0.8, "se": 0.03, "_replicates": jackknife, "_resamples": ("texts", "jackknife_se", 0, 3)},
        {**base, "variant": "trained", "value": 0.85, "se": float("nan"), "_replicates": None, "_resamples": (None, None, None, None)},
    ]  # fmt: skip
    compare._mark_within_uncertainty(rows)
    pruned, trained = rows[1], rows[2]
    assert pruned["paired"] is False and pruned["difference_se"] == pytest.approx((0.02**2 + 0.03**2) ** 0.5)
    assert trained["difference_se"] is None and trained["within_uncertainty"] is None


def test_core_errors_of_runs_that_resampled_windows_say_so_and_never_pair_with_documents():
    """Runs from before core resampled documents resampled its windows one by one (``unit: sequence``): their cells
    say so, and their frac_alive jackknife, over windows, never pairs with one over documents, though both deleted 20
    units: the sqrt(se_a^2 + se_b^2) instead. Two jackknives over documents pair."""
    assert compare._se_kind("core", "bootstrap_se", {"unit": "sequence"}) == compare.CORE_BY_WINDOW["bootstrap_se"]
    assert compare._se_kind("core", "jackknife_se", {"unit": "sequence"}) == compare.CORE_BY_WINDOW["jackknife_se"]
    assert compare._se_kind("core", "bootstrap_se", {"unit": "document (every window)"}) == "bootstrap over test documents"
    assert compare._se_kind("scr", "bootstrap_se", {"unit": "sequence"}) == "bootstrap over test texts"
    base = {"table": "core", "model": "m", "hook": "h", "metric": "frac_alive", "status": "ok", "_runtime": ("cpu", "float32", "x")}
    by_document = {"unit": "document", "n_units": 20, "d_sae": 100, "dies_without": {"3": 1}}
    by_window = {"n_sequences": 20, "d_sae": 100, "dies_without": {"3": 1}}  # an older run's record
    resamples = ("t", "jackknife_se", 0, 0)
    for theirs, paired in ((by_window, False), (by_document, True)):
        rows = [
            {**base, "variant": "pretrained", "value": 0.9, "se": 0.02, "_replicates": by_document, "_resamples": resamples},
            {**base, "variant": "pruned25", "value": 0.8, "se": 0.03, "_replicates": theirs, "_resamples": resamples},
        ]
        compare._mark_within_uncertainty(rows)
        assert rows[1]["paired"] is paired
        if not paired:
            assert rows[1]["difference_se"] == pytest.approx((0.02**2 + 0.03**2) ** 0.5)
    # bootstrap replicates of an older run (windows) and a newer one (documents) on the same texts: unpaired, and the
    # note says the units differ, not that the texts do
    base = {**base, "metric": "ce_loss_score", "note": None}
    rows = [
        {**base, "variant": "pretrained", "value": 0.9, "se": 0.02, "_replicates": [0.9, 0.88, 0.91],
         "_resamples": ("new-id", "bootstrap_se", 0, 3, "document (every test window cut from a drawn text)")},
        {**base, "variant": "pruned25", "value": 0.8, "se": 0.03, "_replicates": [0.8, 0.78, 0.81],
         "_resamples": ("old-id", "bootstrap_se", 0, 3, "sequence")},
    ]  # fmt: skip
    compare._mark_within_uncertainty(rows)
    assert rows[1]["paired"] is False and "resampled other units" in rows[1]["note"] and "other test texts" not in rows[1]["note"]


def test_a_difference_within_float32_rounding_is_marked_even_where_the_error_is_zero():
    """A density share that is 1 in every resample has error 0, while SAEBench's own float32 sum prints it as
    0.99999994 or 1.0000001: that difference is rounding, never a finding. A real difference still is one."""
    model, metric = "tiny-gpt2+prune_llm:x", "normalized_freq_over_1_percent"

    def run(run_id, start, variant, value):
        metrics = {f"core.{metric}": value, f"core.{metric}.bootstrap_se": 0.0}
        tags = {"hook": "hook_resid_post", "layer": "2", "variant": variant, **CPU_TAGS}
        return compare.RunRecord(run_id, "evaluate", run_id, start, params={"suites": "core", "base_model": model, **CPU},
                                 metrics=metrics, tags=tags)  # fmt: skip

    records = [run("p", 1, "pretrained", 0.99999994), run("a", 2, "pruned25", 1.0000001), run("b", 3, "pruned50", 0.9999)]
    table = compare.cells(records).set_index(["table", "metric", "variant"]).loc["core"].loc[metric]
    assert table.loc["pruned25", "within_uncertainty"] is True
    assert table.loc["pruned50", "within_uncertainty"] is False


def test_a_seed_whose_run_logged_nan_is_left_out_of_the_mean_and_said_so():
    """pandas' mean skips NaN silently and the standard error would divide by the wrong count: a seed whose run logged
    no number is left out of both, by name; a cell whose only value is NaN shows NaN, is no finding either way, and
    never fills the difference beside the paper."""
    model = "tiny-gpt2+prune_llm:x"

    def run(run_id, start, seed, scr, variant="pretrained", mse=0.3):
        params = {"suites": "core,scr", "base_model": model, "evaluation.seed": seed, **CPU}
        metrics = {"scr.scr_metric_threshold_10": scr, "core.mse": mse, "core.mse.bootstrap_se": 0.01}
        return compare.RunRecord(run_id, "evaluate", run_id, start, params=params, metrics=metrics,
                                 tags={"hook": "hook_resid_post", "layer": "2", "variant": variant, **CPU_TAGS})  # fmt: skip

    nan = float("nan")
    records = [run("s1", 1, "1", 0.1), run("s2", 2, "2", 0.3), run("s3", 3, "3", nan),
               run("t1", 4, "1", 0.2, "trained"), run("t2", 5, "2", nan, "trained", mse=nan)]  # fmt: skip
    cells = compare.cells(records).set_index(["table", "metric", "variant"])
    mean = cells.loc[("scr", "scr_metric_threshold_10", "pretrained")]
    assert mean["value"] == pytest.approx(0.2) and mean["se"] == pytest.approx(0.1)  # std(0.1, 0.3) / sqrt(2), not / sqrt(3)
    assert mean["run_id"] == "s1,s2" and "mean over 2 seeds (1, 2)" in mean["note"] and "seed 3 left out" in mean["note"]
    one = cells.loc[("scr", "scr_metric_threshold_10", "trained")]
    assert (one["value"], one["run_id"], one["status"]) == (0.2, "t1", "ok") and "seed 1 only" in one["note"]
    unmeasured = cells.loc[("table1", "mse", "trained")]  # its newest run logged NaN
    assert unmeasured["status"] == compare.NOT_A_NUMBER and unmeasured["run_id"] == "t2" and unmeasured["within_uncertainty"] is None
    table1 = compare.markdown(compare.cells(records)).split("### ")[1]
    row = next(line for line in table1.splitlines() if line.startswith("| blocks.2.hook_resid_post | mse |"))
    assert row.endswith("| NaN |"), row  # trained, the last column: shown as the run's NaN, not as missing


def test_beside_the_paper_our_cells_keep_their_run_notes_and_error_and_the_difference_is_marked():
    """The `_vs_paper` tables: our column keeps its run, notes and standard error; the difference is traced to our run,
    carries our standard error (the paper prints none) and is marked ≈ where it is within it."""
    gemma = "google/gemma-2-2b+prune_llm:x"

    def run(run_id, variant, mse, se, start):
        return compare.RunRecord(run_id, "evaluate", run_id, start, params={"suites": "core", "base_model": gemma, **CPU},
                                 metrics={"core.mse": mse, "core.mse.bootstrap_se": se},
                                 tags={"hook": "hook_mlp_out", "layer": "12", "variant": variant, **CPU_TAGS})  # fmt: skip

    paper = compare.paper_numbers().set_index(["table", "output", "metric", "variant"])["value"]
    near, far = paper[("table1", "MLP", "mse", "trained")], paper[("table1", "MLP", "mse", "pruned25")]
    records = [run("p", "pretrained", 0.5, 0.01, 1), run("t", "trained", near + 0.001, 0.01, 2), run("a", "pruned25", far + 0.2, 0.01, 3)]
    beside = compare.cells(records)
    beside = beside[beside["table"] == "table1_vs_paper"].set_index(["metric", "variant"])
    ours, difference = beside.loc[("mse", "trained: ours")], beside.loc[("mse", "trained: ours - paper")]
    assert ours["run_id"] == "t" and ours["se"] == 0.01 and ours["se_kind"]
    assert difference["run_id"] == "t" and difference["se"] == 0.01 and difference["within_uncertainty"] is True
    assert "ours minus the paper's Table 1" in difference["note"]
    assert beside.loc[("mse", "pruned25: ours - paper"), "within_uncertainty"] is False  # 0.2 off: a finding
    assert beside.loc[("mse", "trained: paper"), "run_id"] == "" and pd.isna(beside.loc[("mse", "trained: paper"), "se"])
    assert "≈" in compare._display(difference)


def test_llm_pruning_rows_never_merge_different_pruned_models():
    """Two sparsities that round to one percent, or one setting apart (the layers pruned, the calibration size),
    are rows of their own, each labelled by what tells it from the others; a rerun of one pruned model is its
    row's newer candidate."""

    def pruned(run_id, start, sparsity, layers="None", n_sequences="128", ce=3.0):
        params = {"model": "gpt2", "method": "wanda", "sparsity": sparsity, "nm": "unstructured", "llm_pruning.layers": layers,
                  "calibration.n_sequences": n_sequences, "calibration.batch_size": str(start), **CPU}  # batch size: speed only
        return compare.RunRecord(run_id, "prune_llm", run_id, start, params=params,
                                 metrics={"ce_loss_dense": 2.9, "ce_loss_pruned": ce, "sparsity_actual": float(sparsity)})  # fmt: skip

    records = [pruned("a", 1, "0.333"), pruned("b", 2, "0.334", ce=float("nan")), pruned("c", 3, "0.5"),
               pruned("d", 4, "0.5", layers="[0, 1]"), pruned("e", 5, "0.5", n_sequences="16"), pruned("f", 6, "0.5", ce=3.2)]  # fmt: skip
    table = compare.cells(records)
    table = table[(table["table"] == "llm_pruning") & (table["metric"] == "ce_loss_pruned")].set_index("hook")
    assert table.loc["wanda 33.4%", "status"] == compare.NOT_A_NUMBER and table.loc["wanda 33.3%", "status"] == "ok"  # a float16 NaN
    assert table.loc["wanda 33.3%", "run_id"] == "a" and table.loc["wanda 33.4%", "run_id"] == "b"
    plain = "wanda 50%, calibration.n_sequences=128, llm_pruning.layers=None"
    assert (table.loc[plain, "run_id"], table.loc[plain, "value"], table.loc[plain, "candidates"]) == ("f", 3.2, 2)
    assert table.loc["wanda 50%, calibration.n_sequences=128, llm_pruning.layers=[0, 1]", "run_id"] == "d"
    assert table.loc["wanda 50%, calibration.n_sequences=16, llm_pruning.layers=None", "run_id"] == "e"
    assert len(table) == 5


def test_odd_variant_names_and_latex_specials_are_kept_as_they_are():
    """A variant tag may hold ': ' (what `--tag variant=...` passes on) and a model path LaTeX's special characters:
    the variant keeps its column (it once recursed forever), and the LaTeX escapes every special."""
    assert compare._variant_order(["pruned: 30%"]) == ["pruned: 30%"]
    assert compare._variant_order([]) == []
    assert compare._variant_order(["pretrained: ours", "pretrained: paper"]) == ["pretrained: ours", "pretrained: paper"]
    escaped = compare._latex_escape(r"C:\models\x_{1}^2 ~50% & #1 $")
    assert escaped == r"C:\textbackslash{}models\textbackslash{}x\_\{1\}\^{}2 \textasciitilde{}50\% \& \#1 \$"


def test_ravel_cells_say_what_their_errors_are_over():
    """RAVEL's scores carry dyadic-robust errors over the entities their pairs share; where the pairs could not be traced
    (and in older runs) binomial ones, which are too small and say so; our own shares of independent draws (fact
    accuracy over prompts, the whole-residual swap over its pairs) are rightly binomial."""
    from saecomp.compare import _se_kind

    assert _se_kind("ravel", "cluster_se", {}, "disentanglement_score").startswith("dyadic-robust over the entities")
    assert "too small" in _se_kind("ravel", "binomial_se", {}, "disentanglement_score")
    for ours in ("fact_accuracy", "residual_patch_cause"):
        assert _se_kind("ravel", "binomial_se", {}, ours) == "binomial over test texts or pairs"
