"""compare: the paper's tables and figures from the tracking store (finished runs only, never loose files).

    mlflow run . -e compare                                   # every finished run of the experiment's MLflow experiment
    mlflow run . -e compare -P pipeline_run=<run id>          # the runs one pipeline run started or reused
    mlflow run . -e compare -P tag=variant=pruned25           # only runs with that tag (repeat --tag to narrow more)

The report (Markdown, LaTeX, CSV with every cell's run, PNG figures, one self-contained HTML page) is the run's
`report/` artifact; the Markdown is also printed. Where several finished runs fill one cell, the newest wins and the
report names it; a cell no run fills shows as missing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from entrypoints.common import StepCommand, fail, load, store_reading_option


def selection(exp, pipeline_run: str | None, tag: tuple[str, ...]):
    """(experiment ids, tag filter, records) of the selection, or one clear line before anything is written."""
    import mlflow

    from saecomp.tracking import STEP_TAG, collect_runs

    tags = {}
    for item in tag:
        name, sep, value = item.partition("=")
        if not sep or not name or "'" in item:
            fail(f"tag={item!r} is not valid; valid: name=value, e.g. variant=pruned25")
        tags[name] = value
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(exp.name)
    if experiment is None:
        fail(f"the tracking store {mlflow.get_tracking_uri()} has no experiment {exp.name!r}; valid: run `mlflow run .` (or a step) first")
    if pipeline_run:
        try:
            run = client.get_run(pipeline_run)
        except mlflow.exceptions.MlflowException:
            fail(f"pipeline_run={pipeline_run!r} is not a run of {mlflow.get_tracking_uri()}; valid: the id of a pipeline run")
        from saecomp.tracking import PIPELINE_RUNS_ARTIFACT

        listed = [f.path for f in client.list_artifacts(pipeline_run)]
        if run.data.tags.get(STEP_TAG) == "pipeline" and PIPELINE_RUNS_ARTIFACT not in listed:
            missing = f"has no {PIPELINE_RUNS_ARTIFACT} (its steps did not finish)"
            fail(f"pipeline_run={pipeline_run!r} {missing}; valid: a finished pipeline run")
        if run.data.tags.get(STEP_TAG) != "pipeline":
            kind = run.data.tags.get(STEP_TAG, "non-saecomp")
            article = "an" if kind[0] in "aeiou" else "a"
            fail(f"pipeline_run={pipeline_run!r} is not a pipeline run (it is {article} {kind} run); valid: the id of a pipeline run")
    records = collect_runs([experiment.experiment_id], pipeline_run, tags)
    if not records:
        fail(f"no finished prune_llm, prune_sae or evaluate run in experiment {exp.name!r} matches; valid: a selection with runs")
    return [experiment.experiment_id], tags, records


def key_for(records, pipeline_run: str | None, tags: dict) -> str:
    """compare's key: the runs it reads, the tags that chose them (a ``variant`` tag leaves the other variants'
    columns out of the tables) and compare.py's code: a store with a new run makes a new report, and a pipeline rerun
    that reuses every run reuses its report (so not the pipeline run's id, new with every rerun: its runs say it)."""
    from saecomp.tracking import step_key

    return step_key("compare", {"runs": sorted(r.run_id for r in records), "tags": dict(sorted(tags.items()))})


@click.command(cls=StepCommand)
@store_reading_option
@click.option("--pipeline_run", help="Only the runs this pipeline run started or reused (default: the whole experiment).")
@click.option("--tag", multiple=True, help="Only runs with this tag, name=value (repeatable).")
def main(experiment: str, pipeline_run: str | None, tag: tuple[str, ...]) -> None:
    exp = load(experiment, {}, check_device=False, reads_the_hub=False)  # reads an existing experiment, never creates one: no store check
    _, tags, records = selection(exp, pipeline_run, tag)
    run_compare(exp, records, pipeline_run, tags)


def run_compare(exp, records, pipeline_run: str | None, tags: dict) -> str:
    import mlflow
    import pandas as pd

    from saecomp import compare
    from saecomp.tracking import local_artifacts, step_run

    say = lambda line: click.echo(f"[compare] {line}", err=True)  # noqa: E731
    VERSION = "saecomp.version."  # the library versions each run recorded  # noqa: N806
    key = key_for(records, pipeline_run, tags)
    counts = {step: sum(r.step == step for r in records) for step in ("prune_llm", "prune_sae", "evaluate")}
    scope = f"pipeline run {pipeline_run}" if pipeline_run else f"experiment {exp.name}"
    params = {"experiment_name": exp.name, "pipeline_run": pipeline_run or "", "tags": ",".join(f"{k}={v}" for k, v in tags.items())}
    params.update({f"n_{step}_runs": n for step, n in counts.items()})
    description = f"The paper's tables and figures from {sum(counts.values())} finished runs of {scope}; see report/report.html."
    with step_run("compare", key, params, exp.name, f"compare · {scope}", description) as run:
        say(f"{counts['evaluate']} evaluate, {counts['prune_sae']} prune_sae and {counts['prune_llm']} prune_llm runs of {scope}")
        cells = compare.cells(records, variants=[tags["variant"]] if "variant" in tags else None)
        sweeps = {}
        for record in sorted((r for r in records if r.step == "prune_sae"), key=lambda r: r.start_time):
            levels = {v: record.metrics.get(f"validation.{v}.mse") for v in ("pretrained", "trained")}
            levels = {v: level for v, level in levels.items() if level is not None}
            # the newest sweep per model and hook; the sweep is on validation tokens, so are the levels beside it
            sweep = pd.read_csv(local_artifacts(record.run_id, "sweep.csv"))
            sweeps[(compare.model_of(record), compare.hook_of(record))] = (sweep, levels)
        say(f"{len(cells)} cells ({(cells['status'] == 'missing').sum()} missing); drawing the figures")
        pngs = compare.figures(cells, sweeps)
        provenance = [
            f"{scope}; tracking store {mlflow.get_tracking_uri()}",
            f"compare run {run.info.run_id}; newest finished run per cell",
            *sorted({f"{k.removeprefix(VERSION)} {v}" for r in records for k, v in r.tags.items() if k.startswith(VERSION)}),
        ]
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "report"
            compare.write_report(cells, pngs, folder, f"saecomp · {exp.name}", provenance)
            mlflow.log_artifacts(str(folder), "report")
            click.echo(compare.markdown(cells))
        mlflow.log_metrics({"n_cells": len(cells), "n_missing": int((cells["status"] == "missing").sum())})
    say(f"done: run {run.info.run_id} (report/report.html)")
    return run.info.run_id


if __name__ == "__main__":
    main()
