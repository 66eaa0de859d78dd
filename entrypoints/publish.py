"""publish: pruned SAEs to a Hugging Face Hub repository in SAELens's layout, with a model card.

    mlflow run . -e publish -P repo=<user>/<name> -P dry_run=true       # the exact folder and card, locally; no upload
    mlflow run . -e publish -P repo=<user>/<name>                       # each hook's selected level (private repo)
    mlflow run . -e publish -P repo=<user>/<name> -P sae=runs:/<prune_sae run>/saes/pruned-0.5 -P with_model=true

By default every hook and layer's pruned SAE at the level the selection rule picked (the newest finished prune_sae run
of each cell of the experiment); a level whose selection was not met is published only when named with `sae`. The
token comes from HF_TOKEN or `huggingface-cli login`; it is never logged. New repositories are private unless
`public=true`; existing files are replaced only with `overwrite=true`.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from pathlib import Path

import click

from entrypoints.common import StepCommand, fail, load, store_reading_option

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CORE = ("core.ce_loss_score", "core.kl_div_score", "core.explained_variance", "core.mse", "core.cossim", "core.l0")


def flag(name: str, value: str | None) -> bool:
    if value in (None, ""):
        return False
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    fail(f"{name}={value!r} is not valid; valid: true or false")


@click.command(cls=StepCommand)
@store_reading_option
@click.option("--repo", help="The Hub repository, <user or org>/<name>.")
@click.option("--sae", help="Comma-separated SAEs: runs:/<prune_sae run>/saes/pruned-<level> or models:/<name>/<version> "
              "(default: each cell's selected level).")
@click.option("--dry_run", help="true: write the exact folder and card as this run's artifact; upload nothing.")
@click.option("--public", help="true: create the repository public (default: private).")
@click.option("--overwrite", help="true: replace files the repository already has (default: refuse).")
@click.option("--with_model", help="true: also push the pruned checkpoint to <repo>-pruned-model and name it in the SAEs' metadata.")
def main(experiment, repo, sae, dry_run, public, overwrite, with_model) -> None:
    exp = load(experiment, {}, check_device=False, reads_the_hub=False)  # reads an existing experiment, never creates one: no store check
    given = {"dry_run": dry_run, "public": public, "overwrite": overwrite, "with_model": with_model}
    dry_run, public, overwrite, with_model = (flag(name, value) for name, value in given.items())
    if not repo:
        fail("repo is required; valid: --repo <user or org>/<name> (-P repo=... under mlflow run), e.g. me/tiny-gpt2-pruned-saes")
    if not REPO_ID.match(repo):
        fail(f"repo={repo!r} is not valid; valid: <user or org>/<name>, e.g. me/tiny-gpt2-pruned-saes")
    if not dry_run:
        from huggingface_hub import constants, get_token

        if constants.HF_HUB_OFFLINE:  # the client would refuse every request, after the run had opened
            fail("HF_HUB_OFFLINE=1 forbids the Hub; valid: unset HF_HUB_OFFLINE to publish, or dry_run=true")
        from saecomp.names import hub_unreachable

        if why := hub_unreachable():
            fail(f"the Hub at {why}; valid: publish from a machine that reaches it, or dry_run=true")
        if get_token() is None:
            fail("no Hugging Face token; valid: set HF_TOKEN or run `huggingface-cli login` (or dry_run=true)")
    chosen = choose(exp, sae, experiment)
    run_publish(exp, experiment, repo, chosen, dry_run, public, overwrite, with_model)


def choose(exp, named: str | None, experiment_path: str) -> list[tuple[str, str, bool]]:
    """[(prune_sae run id, level, named explicitly)]: the named SAEs, or, by default, the selected level of each of the
    file's cells where it was met, on the pruned model the file declares (``default_sweeps``)."""
    import mlflow

    from saecomp.tracking import STEP_TAG, local_artifacts

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(exp.name)
    if named:
        chosen = []
        for item in [s.strip() for s in named.split(",") if s.strip()]:
            item = registered_run(client, item)  # a registered version is its prune_sae run's folder
            match = re.fullmatch(r"runs:/([0-9a-f]{32})/saes/pruned-([0-9.]+)", item)
            if not match:
                fail(f"sae={item!r} is not valid; valid: runs:/<prune_sae run id>/saes/pruned-<level> or models:/<name>/<version>")
            try:
                run = client.get_run(match.group(1))
            except mlflow.exceptions.MlflowException:
                fail(f"sae={item!r}: no run {match.group(1)} in {mlflow.get_tracking_uri()}")
            if run.data.tags.get(STEP_TAG) != "prune_sae" or run.info.status != "FINISHED":
                fail(f"sae={item!r}: run {match.group(1)} is not a finished prune_sae run")
            chosen.append((match.group(1), match.group(2), True))
        return chosen
    if experiment is None:
        fail(f"the tracking store {mlflow.get_tracking_uri()} has no experiment {exp.name!r}; valid: run `mlflow run .` first")
    runs = client.search_runs([experiment.experiment_id], f"attributes.status = 'FINISHED' and tags.`{STEP_TAG}` = 'prune_sae'")
    newest = {}
    for run in sorted(default_sweeps(exp, experiment_path, runs), key=lambda r: r.info.start_time):
        newest[(run.data.tags.get("layer"), run.data.tags.get("hook"))] = run
    chosen = []
    for (layer, hook), run in sorted(newest.items(), key=lambda item: (int(item[0][0] or -1), item[0][1])):
        selection = json.loads((local_artifacts(run.info.run_id, "selection.json")).read_text())
        level = f"{selection['selected']:g}"
        if selection.get("met"):
            chosen.append((run.info.run_id, level, False))
        else:
            explicit = f"runs:/{run.info.run_id}/saes/pruned-{level}"
            click.echo(
                f"[publish] blocks.{layer}.{hook}: the selection ({selection['metric']} within {selection['tolerance']} of the "
                f"trained SAE's) was not met at any level; not published (name it to publish anyway: -P sae={explicit})",
                err=True,
            )
    if not chosen:
        fail("no cell met its selection; valid: name the SAEs to publish with sae=runs:/<prune_sae run>/saes/pruned-<level>")
    return chosen


def pruned_model_of(run) -> str | None:
    """The prune_llm run id a prune_sae (or evaluate) run's SAE was made on."""
    return run.data.params.get("pruned_model_run") or run.data.tags.get("pruned_model_run")


def default_sweeps(exp, experiment_path: str, runs: list) -> list:
    """The finished prune_sae ``runs`` the default choice reads: those of the file's hooks and layers on the pruned model
    the file declares. One card describes one pruned model, so sweeps on others (the file's pruning changed since) are
    left out. The declared model is the finished prune_llm run of the file's key, as the pipeline finds it; the key
    also holds the code and the device and dtype, so where that run made no sweep, a model whose logged settings are
    the file's (``prune_llm.logged_settings``: made by other code, or on another device or dtype) is taken and said,
    preferring the file's device and dtype; then, if all the sweeps are on one model, that one, said. Several others:
    the choice is the user's."""
    import mlflow

    from entrypoints import prune_llm
    from saecomp.tracking import find_finished_run

    layers = None if exp.sae.layers == "all" else {str(layer) for layer in exp.sae.layers}
    runs = [r for r in runs if r.data.tags.get("hook") in exp.sae.hooks and (layers is None or r.data.tags.get("layer") in layers)]
    if not runs:
        fail(f"experiment {exp.name!r} has no finished prune_sae run of the file's hooks and layers; valid: run `mlflow run .` "
             "(or -e prune_sae) first")  # fmt: skip
    models = sorted({str(pruned_model_of(r)) for r in runs})
    declared = find_finished_run("prune_llm", prune_llm.key_for(exp, experiment_path))
    if declared in models:
        return [r for r in runs if pruned_model_of(r) == declared]
    client = mlflow.MlflowClient()

    def logged(run_id: str) -> dict:
        try:
            return client.get_run(run_id).data.params
        except mlflow.exceptions.MlflowException:  # a deleted run, or none ("None": a sweep of the dense model)
            return {}

    settings = prune_llm.logged_settings(exp)
    alike = [m for m in models if all(logged(m).get(k) == v for k, v in settings.items())]
    same_runtime = [m for m in alike if all(logged(m).get(k) == str(v) for k, v in exp.runtime().items())]
    taken = same_runtime if len(same_runtime) == 1 else alike if len(alike) == 1 else []
    if taken:
        click.echo(f"[publish] taking the sweeps on prune_llm run {taken[0]}: it has the pruning settings {experiment_path} "
                   "declares, made by other code or on another device or dtype (the file's key finds no run with sweeps)",
                   err=True)  # fmt: skip
        return [r for r in runs if str(pruned_model_of(r)) == taken[0]]
    if len(models) == 1:
        click.echo(f"[publish] no pruned model with the settings {experiment_path} declares has sweeps; taking the store's "
                   f"sweeps, all on one pruned model (prune_llm run {models[0]})", err=True)  # fmt: skip
        return runs
    fail(f"no pruned model with the settings {experiment_path} declares has a finished prune_sae run, and the store's are on "
         f"{len(models)} other pruned models (prune_llm runs {', '.join(models)}); valid: run `mlflow run .` with this file, or name "
         "the SAEs with sae=runs:/<prune_sae run>/saes/pruned-<level> (one pruned model per repo)")  # fmt: skip


def registered_run(client, item: str) -> str:
    """``models:/<name>/<version>`` of a pruned SAE as the ``runs:/`` folder it was registered from (prune_sae
    registers each level's folder itself); anything else unchanged."""
    import mlflow

    match = re.fullmatch(r"models:/(.+)/(\d+)", item)
    if not match:
        return item
    try:
        version = client.get_model_version(match.group(1), match.group(2))
    except mlflow.exceptions.MlflowException:
        fail(f"sae={item!r}: no such registered version in {mlflow.get_tracking_uri()}; valid: models:/<name>/<version> of a pruned SAE")
    if version.tags.get("variant") != "pruned" or not version.tags.get("sparsity"):
        fail(f"sae={item!r} is a {version.tags.get('variant', 'untagged')} SAE; valid: a version prune_sae registered (variant pruned)")
    return f"runs:/{version.run_id}/saes/pruned-{version.tags['sparsity']}"


def gather(exp, experiment: str, chosen, companion: str | None):
    """The SAEs to stage (saecomp.publish.PublishedSAE), their provenance and evaluation read from the store."""
    import mlflow

    from saecomp.publish import PublishedSAE, pruned_layers, rebuild_command, sae_id_for
    from saecomp.tracking import STEP_TAG, local_artifacts

    client = mlflow.MlflowClient()
    out = []
    for run_id, level, named in chosen:
        run = client.get_run(run_id)
        path = f"saes/pruned-{level}"
        try:
            folder = local_artifacts(run_id, path)
        except Exception:
            fail(f"sae=runs:/{run_id}/{path}: the run has no such SAE; valid: a level it logged under saes/")
        prune_llm = pruned_model_of(run)
        llm = client.get_run(prune_llm).data.params if prune_llm else {}
        hook_name = f"blocks.{run.data.tags['layer']}.{run.data.tags['hook']}"
        selection = json.loads(local_artifacts(run_id, "selection.json").read_text())
        try:
            layers = pruned_layers(llm)
        except ValueError as error:
            fail(f"sae=runs:/{run_id}/{path}: {error}; valid: an SAE pruned on a model that some block was pruned in")
        seq_len = llm.get("calibration.seq_len")
        seq_len = "the model's context of" if seq_len in (None, "None") else seq_len
        pruned_model = {
            "base_model": llm.get("model", exp.model),
            "method": llm.get("method"),
            "sparsity": llm.get("sparsity"),
            "nm": llm.get("nm"),
            "calibration": f"{llm.get('calibration.n_sequences')} sequences of {seq_len} tokens from "
            f"{llm.get('calibration.dataset') if llm.get('calibration.dataset') not in (None, 'None') else llm.get('data.dataset')}, "
            f"seed {llm.get('calibration.seed')}",
            "rebuild_command": rebuild_command(experiment, llm),  # prune_llm logs the file's settings, not its path
            "prune_llm_run": prune_llm,
            "layers": layers,
        }
        if companion:
            pruned_model["repo"] = companion
        source = f"runs:/{run_id}/{path}"
        on_this_model = f"tags.sae_source = '{source}' and tags.pruned_model_run = '{prune_llm}'"  # not the dense model's
        query = f"attributes.status = 'FINISHED' and tags.`{STEP_TAG}` = 'evaluate' and {on_this_model}"
        evaluations = client.search_runs([run.info.experiment_id], query)
        evaluation = {}
        for evaluated in sorted(evaluations, key=lambda r: r.info.start_time):  # the newest wins
            for name in (name for name in CORE if name in evaluated.data.metrics):
                evaluation[name] = evaluated.data.metrics[name]
                evaluation.pop(f"{name}.bootstrap_se", None)  # a value's standard error comes from the run of the value
                if f"{name}.bootstrap_se" in evaluated.data.metrics:
                    evaluation[f"{name}.bootstrap_se"] = evaluated.data.metrics[f"{name}.bootstrap_se"]
        provenance = {
            "prune_sae_run": run_id,
            "prune_llm_run": prune_llm,
            "code": run.data.tags.get("saecomp.code", "?"),
            "git_commit": run.data.tags.get("mlflow.source.git.commit", "?"),
            "experiment_file": experiment,
            "named_explicitly": named,
        }
        method = run.data.params.get("method") or run.data.tags.get("method", "pruned")
        out.append(PublishedSAE(Path(folder), sae_id_for(hook_name, method, float(level)), pruned_model, provenance, selection, evaluation))
    return out, (out[0].pruned_model["prune_llm_run"] if out else None)


def params_sae(chosen) -> list[str]:
    return [f"runs:/{run_id}/saes/pruned-{level}" for run_id, level, _ in chosen]


def run_publish(exp, experiment, repo, chosen, dry_run, public, overwrite, with_model) -> str:
    import mlflow

    from saecomp.publish import already_published, published_index, refuse_clashes, stage, upload
    from saecomp.tracking import local_artifacts, step_key, step_run

    say = lambda line: click.echo(f"[publish] {line}", err=True)  # noqa: E731
    companion = f"{repo}-pruned-model" if with_model else None
    saes, prune_llm = gather(exp, experiment, chosen, companion)
    models = {sae.pruned_model["prune_llm_run"] for sae in saes}
    if len(models) > 1:  # one card, one model: SAEs of different pruned models go to different repos
        fail(f"sae={','.join(params_sae(chosen))} come from {len(models)} pruned models ({', '.join(sorted(map(str, models)))}); "
             "valid: SAEs of one prune_llm run per repo")  # fmt: skip
    ids = [sae.sae_id for sae in saes]
    if len(set(ids)) < len(ids):
        fail(f"sae={','.join(params_sae(chosen))} name one sae_id twice; valid: each SAE once")
    base_model = saes[0].pruned_model["base_model"]
    params = {
        "repo": repo,
        "saes": ",".join(params_sae(chosen)),
        "dry_run": dry_run,
        "public": public,
        "overwrite": overwrite,
        "with_model": with_model,
    }
    key = step_key("publish", {**params, "attempt": uuid.uuid4().hex})  # an action, never reused
    name = f"publish · {repo}" + (" (dry run)" if dry_run else "")
    description = f"{len(saes)} pruned SAE(s) to {repo}" + (": dry run, the folder is this run's publish/ artifact." if dry_run else ".")
    index = None if dry_run else published_index(repo)  # what an earlier publish put there: kept, and on the card
    if index and index.get("prune_llm_run") != prune_llm:
        fail(f"repo={repo!r} already holds SAEs of another pruned model (prune_llm run {index.get('prune_llm_run')}, "
             f"these are of {prune_llm}); valid: a repo per pruned model")  # fmt: skip
    published = already_published(index, saes)
    with step_run("publish", key, params, exp.name, name, description) as run, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / repo.split("/")[1]
        digests = stage(saes, repo, folder, base_model, published=published)
        if published:
            say(f"{repo} already holds {len(published)} SAE(s) of this model: kept, and listed on the card beside the new ones")
        mlflow.log_dict(digests, "publish_manifest.json")
        for sae in saes:
            say(f"{sae.sae_id}: from prune_sae run {sae.provenance['prune_sae_run']}")
        if dry_run:
            mlflow.log_artifacts(str(folder), "publish")
            say(f"dry run: {len(digests)} files staged; nothing uploaded (the run's publish/ artifact; SAE.load_from_disk reads each SAE). "
                "The card lists these SAEs only: a real publish also lists those the repository already holds.")
        else:
            checkpoint = Path(local_artifacts(prune_llm, "pruned_model")) if companion else None
            try:  # every repository checked before anything is uploaded
                if index and index["card_edited"]:
                    say(f"{repo}'s README.md was edited since saecomp wrote it: rewriting it needs overwrite=true")
                replaced = refuse_clashes(folder, repo, overwrite, merged=bool(index) and not index["card_edited"])
                replaced += refuse_clashes(checkpoint, companion, overwrite) if companion else []
            except FileExistsError as error:
                fail(str(error))
            if replaced:
                say(f"overwrite=true: replacing {', '.join(replaced)}")
            if companion:
                model = upload(checkpoint, companion, not public, f"saecomp: pruned model (prune_llm run {prune_llm})")
                mlflow.set_tags({"saecomp.hub.model_repo": companion, "saecomp.hub.model_commit": model["commit"]})
                say(f"{companion}: {len(model['files'])} files, commit {model['commit']}")
            result = upload(folder, repo, not public, f"saecomp: {len(saes)} pruned SAE(s) (publish run {run.info.run_id})")
            mlflow.set_tags({"saecomp.hub.repo": repo, "saecomp.hub.commit": result["commit"]})
            mlflow.log_dict(result, "uploaded.json")
            mlflow.log_artifact(str(folder / "README.md"), "publish")
            say(f"{repo}: {len(result['files'])} files, commit {result['commit']} ({result['url']})")
    return run.info.run_id


if __name__ == "__main__":
    main()
