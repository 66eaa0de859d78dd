"""evaluate: SAEBench's suites for one SAE spliced into the pruned (or a named) model.

    mlflow run . -e evaluate                                        # the experiment's pretrained SAE, its suites
    mlflow run . -e evaluate -P sae=runs:/<prune_sae run>/saes/pruned-0.25 -P variant=pruned25
    mlflow run . -e evaluate -P model=dense -P suites=core,sparse_probing

The model is the experiment's pruned model unless told otherwise. Core reads the test pool (`document_plan`), BOS
first where the SAE saw it; SCR, TPP and sparse probing read SAEBench's labelled datasets (for a tiny model,
generated from the tiny world: saecomp.saebench_data); absorption reads the tokenizer's vocabulary; RAVEL runs on
the model's Hugging Face checkpoint with SAEBench's city facts (for a tiny model, the world's cities).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import re
import sys
import tempfile
import threading
from pathlib import Path

import click

from entrypoints.common import StepCommand, experiment_option, fail, load, load_source, model_dims, resolve_base, world_step

LIBRARY_LOGGERS = ("datasets",)
"""Libraries whose log records during a suite go to its log: `datasets` says, per dataset and load, that it uses the
cached copy offline (about 45 lines per cold pipeline)."""
_suite_log = threading.local()  # the log of the suite this thread runs, if any


class _ToSuiteLog(logging.Handler):
    """A library logger's one handler: a record goes to the log of the suite its thread runs, else (or if that log was
    closed meanwhile) where it went before: the handlers the logger had, then its ancestors' as propagation would (the
    logger no longer propagates, or a record in a suite's log would also reach the root logger's handler on the
    terminal, which any library's module-level `logging.warning` call installs)."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.before, self.propagated = list(logger.handlers), logger.propagate
        self.parent = logger.parent

    def emit(self, record: logging.LogRecord) -> None:
        log = getattr(_suite_log, "log", None)
        if log is not None:
            try:
                log.write(f"{record.levelname}:{record.name}: {record.getMessage()}\n")
                return
            except (ValueError, OSError):
                pass
        for handler in self.before:
            if record.levelno >= handler.level:
                handler.handle(record)
        ancestor = self.parent if self.propagated else None
        while ancestor is not None:  # as Logger.callHandlers propagates
            for handler in ancestor.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
            ancestor = ancestor.parent if ancestor.propagate else None


@contextlib.contextmanager
def library_warnings_to(log, terminal):
    """The libraries' warnings during a suite (scikit-learn's deprecations, about a thousand per cold pipeline; SAEBench's
    decoder-norm notes) and their log records (``LIBRARY_LOGGERS``) into the suite's log with SAEBench's prints;
    saecomp's own (a suite's errors falling back, twins not computed) still reach ``terminal``. Warnings are
    process-wide: where steps run as threads of one process, a warning may land in another suite's log, never in none;
    log records go by thread."""
    import warnings

    shown = warnings.showwarning
    ours = str(Path(__file__).resolve().parents[1] / "saecomp")

    def show(message, category, filename, lineno, file=None, line=None):
        try:
            if not str(filename).startswith(ours):
                log.write(warnings.formatwarning(message, category, filename, lineno, line))
                return
        except (ValueError, OSError):  # a log closed meanwhile (steps in threads of one process): the terminal then
            pass
        shown(message, category, filename, lineno, file or terminal, line)  # (sys.stderr may be the suite's log)

    for name in LIBRARY_LOGGERS:  # installed once per process, and left: with no suite running it passes records on
        importlib.import_module(name)  # the library adds its own handler on import: after that, never beside ours
        logger = logging.getLogger(name)
        if not any(isinstance(h, _ToSuiteLog) for h in logger.handlers):
            logger.handlers, logger.propagate = [_ToSuiteLog(logger)], False
    outer = getattr(_suite_log, "log", None)
    _suite_log.log = log
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        _suite_log.log = outer


@click.command(cls=StepCommand)
@experiment_option
@click.option("--sae", help="The SAE: release:sae_id, runs:/<id>/<path>, models:/<name>/<version>, or a SAELens folder.")
@click.option("--model", "base", help="pruned (the experiment's prune_llm run; default), dense, or a prune_llm run id.")
@click.option("--suites", help="Comma-separated SAEBench suites: core, absorption, scr, tpp, sparse_probing, ravel.")
@click.option("--hook", help="With no --sae: the hook of the experiment's pretrained SAE (default: the experiment's first).")
@click.option("--layer", help="With no --sae: its layer (default: the experiment's first).")
@click.option("--variant", help="What the SAE is, for the tables: pretrained, pruned25, pruned50, trained, ... (a tag; in the key).")
@click.option(
    "--inapplicable",
    type=click.Choice(["refuse", "tag"]),
    default="refuse",
    help="A suite named in --suites that cannot apply here (RAVEL off hook_resid_post or on GPT-2): refuse before any "
    "compute (default), or run the others and tag it not applicable (what the pipeline asks).",
)
@click.option(
    "--seed",
    help="SAEBench's random seed for every suite but core (default: the experiment's evaluation.seed, 42). Where runs "
    "with several seeds fill one cell, compare shows their mean and its standard error over the seeds.",
)
@click.option(
    "--shared_activations",
    type=click.Path(file_okay=False),
    help="A folder where SAEs evaluated on the same model, hook and config share the model-side work of SCR, TPP and "
    "sparse probing (the model's activations on the labelled texts and the probes trained on them), as SAEBench's "
    "run_eval shares it across its SAE list; the numbers do not change. The pipeline passes one per run and deletes it. "
    "Default: computed afresh.",
)
def main(experiment, sae, base, suites, hook, layer, variant, inapplicable, seed, shared_activations) -> None:
    from saecomp.names import HOOKS, check_hook, check_suites

    suite_list = [s.strip() for s in str(suites).split(",") if s.strip()] if suites else None
    exp = load(experiment, {"evaluation.suites": suite_list, "evaluation.seed": seed})
    try:
        check_suites(exp.evaluation.suites)
    except ValueError as error:
        fail(str(error))
    dims = model_dims(exp)
    hook = hook or exp.sae.hooks[0]
    if hook not in HOOKS:
        fail(f"hook={hook!r} is not valid; valid: {', '.join(HOOKS)}")
    try:
        layer = int(layer) if layer not in (None, "") else exp.sae_layers(dims.n_layers)[0]
        check_hook(dims, hook, layer)
    except ValueError as error:
        fail(str(error) if "layer" in str(error) else f"layer={layer!r} is not an integer")
    base = base or "pruned"
    resolved = None
    if base not in ("pruned", "dense"):  # a run id: checked now, before anything is computed
        resolved = resolve_base(exp, experiment, base, name="model")
    reference = sae or exp.pretrained_source(hook, layer)
    if reference is not None:
        from saecomp.names import SAESource

        try:
            SAESource.parse(reference)
        except ValueError as error:
            fail(f"sae={reference!r} is not a loadable SAE ({error})")
    check_sae_bench()  # after the checks above, which need neither torch nor transformers (seconds to import)
    refuse_ravel = suite_list and "ravel" in suite_list and inapplicable == "refuse"  # asked for explicitly
    if reference is not None:
        source, sae_object = check_sae(load_source("sae", reference), dims, exp.model)
        check_sizes(exp, sae_object)
        hook_name = sae_object.cfg.metadata.hook_name
    else:
        hook_name = f"blocks.{layer}.{hook}"
    if refuse_ravel:  # where it cannot apply, say so before anything is computed
        from saecomp.evaluate import ravel_not_applicable

        reason = ravel_not_applicable(hook_name, dims.architecture)
        if reason:
            fail(f"suites=ravel cannot run here: {reason}; valid: an SAE at hook_resid_post of a Gemma-2 model")
    checkpoint, model_label, prune_run = resolved or resolve_base(exp, experiment, base, name="model")
    if reference is None:  # the tiny world's pretrained SAE: trained now unless a finished run has it
        from entrypoints.prune_sae import dependency

        reference = dependency(exp, experiment, hook, layer, "dense", exp.model)
        source, sae_object = check_sae(load_source("sae", reference), dims, exp.model)
        check_sizes(exp, sae_object)
    shared = Path(shared_activations) if shared_activations else None
    run_evaluate(exp, experiment, source, sae_object, checkpoint, model_label, prune_run, variant or "unnamed", shared)


def check_sae_bench() -> None:
    """SAEBench present, and importable beside transformers' model classes, or one line naming the fix."""
    import importlib.util

    if importlib.util.find_spec("sae_bench") is None:
        fail(
            "sae-bench is not installed in this environment; install it without its declared torchvision "
            "(whose PyPI build breaks a CPU torch): pip install --no-deps sae-bench==0.6.0"
        )
    try:
        from transformers import GPT2LMHeadModel  # noqa: F401  (fails when a mismatched torchvision is installed)
    except Exception as error:
        first = str(error).splitlines()[0][:200]
        fail(f"transformers cannot load its model classes ({first}); if torchvision is installed: pip uninstall -y torchvision")


def check_sae(loaded, dims, model: str):
    """(source, SAE), after checking that its hook is one of ours and exists in the model with its width."""
    from saecomp.names import HOOKS, check_hook, hook_d_in

    source, sae = loaded
    name = sae.cfg.metadata.hook_name or ""
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in HOOKS:
        fail(f"the SAE's hook {name!r} is not valid; valid: blocks.<layer>.{{{', '.join(HOOKS)}}}")
    try:
        check_hook(dims, parts[2], int(parts[1]))
    except ValueError as error:
        fail(f"the SAE's hook {name} does not fit {model}: {error}")
    width = hook_d_in(dims, parts[2])
    if sae.cfg.d_in != width:
        fail(f"the SAE's d_in={sae.cfg.d_in} does not fit {name} of {model}, whose width is {width}")
    return source, sae


def check_sizes(exp, sae) -> None:
    """The numbers of latents the suites ablate or probe exist in this SAE (SAEBench asserts deep inside)."""
    ev = exp.evaluation
    for suites, name in (({"scr", "tpp"}, "scr_tpp_n_values"), ({"sparse_probing"}, "sparse_probing_k")):
        largest = max(getattr(ev, name))
        if suites & set(ev.suites) and largest > sae.cfg.d_sae:
            width = sae.cfg.d_sae
            fail(f"evaluation.{name}={getattr(ev, name)} asks for {largest} latents, but the SAE has {width}; valid: at most {width}")


def suite_keys(exp, experiment_path: str, source, model_label: str, variant: str) -> dict[str, str]:
    """Each suite's own key: the SAE, the variant it is evaluated as, the model, the data and only that suite's sizes
    (config.SUITE_FIELDS), so that adding a suite or changing one suite's sizes recomputes that suite alone."""
    import dataclasses

    from saecomp.config import SUITE_FIELDS
    from saecomp.data import document_plan
    from saecomp.names import TINY_MODELS
    from saecomp.tracking import step_key

    ev = exp.evaluation.model_dump()
    inputs = {
        "sae": source.identity(),  # a folder's files, an alias's version: not its name alone
        # the column compare puts it in (its `variant` tag): one SAE evaluated as two variants is two runs, never one
        # run under the first name
        "variant": variant,
        "model": model_label,
        **exp.runtime(),
    }
    if exp.model in TINY_MODELS:
        inputs["world"] = world_step(exp, experiment_path)[0]
    # the text core reads, the test pool (it moves with the pools before it; WANDA's own calibration fields reach a
    # pruned model through its prune_llm run, in the model's label); the other suites read their labelled data
    read = {"core": {"test_pool": dataclasses.asdict(document_plan(exp)["test"])}}
    return {
        suite: step_key("evaluate", {**inputs, "suite": suite, **read.get(suite, {}), **{f: ev[f] for f in SUITE_FIELDS[suite]}})
        for suite in exp.evaluation.suites
    }


def key_for(exp, experiment_path: str, source, model_label: str, variant: str) -> str:
    """The run's key: its suites' keys."""
    from saecomp.tracking import step_key

    return step_key("evaluate", suite_keys(exp, experiment_path, source, model_label, variant))


def run_evaluate(exp, experiment_path, source, sae, checkpoint, model_label, prune_run, variant, shared: Path | None = None) -> str:
    import mlflow

    from saecomp.config import SUITE_FIELDS
    from saecomp.evaluate import NotApplicable, run_suite, saebench_config
    from saecomp.models import TINY_MODELS, load_model
    from saecomp.saes import processing_kwargs
    from saecomp.tracking import SUITE_KEY_TAG, step_run

    terminal = sys.stderr  # (during a suite sys.stderr is its log, and the progress lines still go here)
    say = lambda line: click.echo(f"[evaluate] {line}", file=terminal)  # noqa: E731
    ev = exp.evaluation
    tiny = exp.model in TINY_MODELS
    hook_name = sae.cfg.metadata.hook_name
    _, layer, hook = hook_name.split(".", 2)
    sizes = {f"evaluation.{name}": getattr(ev, name) for suite in ev.suites for name in SUITE_FIELDS[suite]}
    params = {
        **exp.runtime(),
        "sae": source.describe(),
        "model": exp.model,
        "base_model": model_label,
        "pruned_model_run": prune_run or "none (dense)",
        "suites": ",".join(ev.suites),
        "hook": hook,
        "layer": layer,
        "variant": variant,
        **{name: ",".join(map(str, v)) if isinstance(v, list) else v for name, v in sizes.items()},
    }
    keys = suite_keys(exp, experiment_path, source, model_label, variant)
    key = key_for(exp, experiment_path, source, model_label, variant)
    from entrypoints.common import pruning_label

    on = pruning_label(exp) if prune_run else f"{exp.model} dense"
    run_name = f"evaluate · {hook_name} · {variant} · {on}"
    description = f"SAEBench ({', '.join(ev.suites)}) for the {variant} SAE {source.describe()} spliced into {on}" + (
        f" (prune_llm run `{prune_run}`)." if prune_run else "."
    )
    tags = {"variant": variant, "hook": hook, "layer": layer, "sae_source": source.describe(), "pruned_model_run": prune_run or ""}
    tags.update({f"{SUITE_KEY_TAG}{suite}": suite_key for suite, suite_key in keys.items()})
    sparsity = re.search(r"pruned-([0-9.]+)$", source.describe())
    if sparsity:
        tags["sparsity"] = sparsity.group(1)
    with step_run("evaluate", key, params, exp.name, run_name, description, tags) as run:
        world = None
        if tiny:
            from entrypoints.common import resolve_world

            world = resolve_world(exp, experiment_path)
        # The SAE is spliced into the model loaded the way its metadata asks (GUIDE §3).
        loaded = load_model(exp.model, checkpoint, exp.dtype, processing_kwargs(sae), exp.device)
        if shared is not None:  # the model side is shared only between SAEs on the same model, loaded the same way
            # The model by what it is: its label ("tiny-gpt2" names the dense model of any world), the world it lives in,
            # the checkpoint folder's files as they are now (names, sizes, times: a model retrained in place is another)
            files = sorted(Path(checkpoint).rglob("*")) if checkpoint and Path(checkpoint).is_dir() else []
            model = {"label": model_label, "world": world_step(exp, experiment_path)[0] if tiny else None,
                     "checkpoint": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]}  # fmt: skip
            processing = json.dumps({"model": model, "processing": processing_kwargs(sae)}, sort_keys=True)
            shared = shared / f"model-{hashlib.sha256(processing.encode()).hexdigest()[:12]}"
        # SAEBench keys its caches by model name: each model variant gets its own (we also give it fresh folders).
        loaded.tl.cfg.model_name = model_label
        sae = sae.to(exp.device)
        failures, not_applicable = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            probing = [suite for suite in ev.suites if suite not in ("core", "ravel")]  # the suites that read labelled texts
            adapter = contextlib.nullcontext({})
            if probing and tiny:
                adapter = tiny_world_datasets(exp, world, tmp / "data", say)
            elif probing:
                from saecomp.saebench_data import default_datasets, hub_repo_of, pinned_labelled_data

                read = set()
                if "sparse_probing" in probing:
                    read |= set(ev.sparse_probing_datasets or default_datasets("sparse_probing_datasets", tiny))
                if {"scr", "tpp"} & set(probing):
                    read |= set(ev.scr_tpp_datasets or default_datasets("scr_tpp_datasets", tiny))
                adapter = pinned_labelled_data(ev.labelled_data_revisions, sorted({hub_repo_of(name) for name in read}))

            def run_one(suite: str):
                if suite == "core":
                    return run_core_on_test_tokens(exp, world, loaded, sae, source, model_label, tmp, say)
                if suite == "ravel":
                    return run_ravel_on(exp, loaded, sae, str(checkpoint or exp.model), source, model_label, tmp / "ravel", say)
                config = saebench_config(suite, ev, model_label, exp.dtype, loaded.tl, tiny)
                return run_suite(suite, loaded.tl, sae, config, tmp / "saebench" / suite, source.describe(), shared)

            with adapter as labelled_data:
                if labelled_data:  # online: the commit of every labelled Hub dataset the suites read
                    mlflow.set_tag("saecomp.labelled_data", ", ".join(f"{repo}@{commit}" for repo, commit in sorted(labelled_data.items())))
                    if shared is not None:  # a shared model side holds activations of exactly these commits' texts
                        commits = json.dumps(labelled_data, sort_keys=True)
                        shared = shared / f"labelled-{hashlib.sha256(commits.encode()).hexdigest()[:12]}"
                for suite in ev.suites:
                    say(f"{suite}: running")
                    output_log = tmp / "saebench_output" / f"{suite}.log"
                    output_log.parent.mkdir(exist_ok=True)
                    try:
                        # SAEBench prints a line per probe and per score (thousands per pipeline) and draws its
                        # progress bars on stderr: into the run's saebench_output/<suite>.log artifact, not over the
                        # steps' progress on the terminal
                        with (
                            output_log.open("w") as log,
                            library_warnings_to(log, terminal),
                            contextlib.redirect_stdout(log),
                            contextlib.redirect_stderr(log),
                        ):
                            result = run_one(suite)
                    except NotApplicable as reason:  # no number, not a failure
                        not_applicable[suite] = str(reason)
                        mlflow.set_tag(f"saecomp.{suite}.not_applicable", str(reason)[:5000])
                        say(f"{suite}: not applicable ({reason})")
                        continue
                    except Exception as error:  # one suite's failure must not stop the others; the run then FAILS
                        failures[suite] = f"{type(error).__name__}: {str(error).splitlines()[0][:500] if str(error) else ''}"
                        mlflow.set_tag(f"saecomp.{suite}.failed", failures[suite])
                        say(f"{suite}: failed ({failures[suite]})")
                        continue
                    finally:
                        if output_log.stat().st_size:
                            mlflow.log_artifact(str(output_log), "saebench_output")
                    mlflow.log_metrics({**result.metrics, f"{suite}.seconds": result.seconds})
                    mlflow.set_tags(result.tags)
                    (tmp / f"{suite}.json").write_text(json.dumps(result.output, indent=1))
                    mlflow.log_artifact(str(tmp / f"{suite}.json"), "saebench")
                    for folder, extra in (("uncertainty", result.uncertainty), ("corrected", result.corrected)):
                        if extra:  # what stands behind the *_se metrics; SCR's/TPP's padding-masked values
                            (tmp / folder).mkdir(exist_ok=True)
                            (tmp / folder / f"{suite}.json").write_text(json.dumps(extra))
                            mlflow.log_artifact(str(tmp / folder / f"{suite}.json"), folder)
                    headline = [k for k in HEADLINES.get(suite, ()) if k in result.metrics]
                    say(f"{suite}: done in {result.seconds:.1f} s; " + ", ".join(f"{k} {result.metrics[k]:.4f}" for k in headline))
        if failures:
            raise RuntimeError(f"suites failed: {', '.join(failures)} (see the run's saecomp.<suite>.failed tags)")
        say(f"done: run {run.info.run_id}" + (f"; not applicable: {', '.join(not_applicable)}" if not_applicable else ""))
    return run.info.run_id


HEADLINES = {
    "core": ("core.ce_loss_score", "core.kl_div_score", "core.explained_variance"),
    "absorption": ("absorption.mean_absorption_fraction_score", "absorption.mean_full_absorption_score"),
    "scr": ("scr.scr_metric_threshold_10", "scr.scr_metric_threshold_50"),
    "tpp": ("tpp.tpp_threshold_10_total_metric", "tpp.tpp_threshold_50_total_metric"),
    "sparse_probing": (
        "sparse_probing.llm_test_accuracy",
        "sparse_probing.sae_top_1_test_accuracy",
        "sparse_probing.sae_top_5_test_accuracy",
    ),
    "ravel": (
        "ravel.disentanglement_score",
        "ravel.cause_score",
        "ravel.isolation_score",
        "ravel.residual_patch_cause",
        "ravel.fact_accuracy",
        "ravel.n_entities_kept",
    ),
}


def run_ravel_on(exp, loaded, sae, tokenizer_source: str, source, model_label, folder: Path, say):
    """SAEBench's RAVEL on the loaded model's Hugging Face copy (the same weights as the TransformerLens one); for a
    tiny model with the world's city facts, written where SAEBench looks for RAVEL's files (the `datasets/ravel`
    artifact). Where it cannot apply, it says so before anything is written."""
    import mlflow

    from saecomp.evaluate import NotApplicable, ravel_config, ravel_not_applicable, run_ravel
    from saecomp.names import TINY_MODELS

    reason = ravel_not_applicable(sae.cfg.metadata.hook_name, loaded.architecture)
    if reason:
        raise NotApplicable(reason)
    tiny = exp.model in TINY_MODELS
    if tiny:
        from saecomp.saebench_data import write_ravel_files

        counts = write_ravel_files(exp.world_config().corpus, folder)
        say(f"ravel: the world's city facts, {counts['entities']} cities, {counts['prompts']} prompts")
        mlflow.log_artifacts(str(folder / "base"), "datasets/ravel")
    else:
        from saecomp.evaluate import RAVEL_PROMPTS_REPO, fetch_ravel_prompts

        commit = fetch_ravel_prompts(folder, exp.evaluation.ravel_data_revision)
        say(f"ravel: {RAVEL_PROMPTS_REPO} at {exp.evaluation.ravel_data_revision} = commit {commit}")
        mlflow.set_tag("saecomp.ravel.data", f"{RAVEL_PROMPTS_REPO}@{commit}")
    config = ravel_config(exp.evaluation, tokenizer_source, exp.dtype, folder, tiny)
    if not tiny:  # every class asked for must be in the pinned files: SAEBench would download the newest for one that is not
        from saecomp.saebench_data import check_ravel_files

        check_ravel_files(folder, config.entity_attribute_selection)
    hf_model = loaded.hf.to(exp.device)
    try:
        return run_ravel(hf_model, sae, config, folder / "out", source.describe(), model_label)
    finally:
        loaded.hf.to("cpu")  # where LoadedModel keeps it


def run_core_on_test_tokens(exp, world, loaded, sae, source, model_label, tmp: Path, say):
    """SAEBench core on the test pool's windows (BOS first where the SAE saw it), its bootstrap resampling the documents
    they were cut from; the tokens and each window's document are an artifact."""
    import mlflow
    from safetensors.torch import save_file

    from saecomp.data import document_plan, held_out_windows, iter_documents, sae_prepends_bos, special_token_ids
    from saecomp.evaluate import CoreSizes, run_core

    ev = exp.evaluation
    context = min(ev.context_size or sae.cfg.metadata.context_size or loaded.tl.cfg.n_ctx, loaded.tl.cfg.n_ctx)
    prepend_bos = sae_prepends_bos(sae.cfg.metadata.prepend_bos, loaded.architecture, loaded.tokenizer)
    plan = document_plan(exp)
    tokens, documents = held_out_windows(
        iter_documents(plan["test"], world), loaded.tokenizer, ev.n_sequences, context, bool(prepend_bos), "test", "evaluation.n_sequences"
    )
    say(
        f"core: {sae.cfg.metadata.hook_name} of {model_label}, {tokens.numel()} test tokens from {plan['test'].describe()} "
        f"({len(documents.unique())} documents)"
    )
    # test_documents [n]: the index in the test pool of the document each window holds most of
    save_file({"test_tokens": tokens.contiguous(), "test_documents": documents.contiguous()}, tmp / "tokens.safetensors")
    mlflow.log_artifact(str(tmp / "tokens.safetensors"))
    sizes = CoreSizes(ev.batch_size_prompts, ev.n_reconstruction_batches, ev.n_sparsity_variance_batches)
    special = special_token_ids(loaded.tokenizer)
    return run_core(loaded.tl, sae, tokens, special, sizes, model_name=model_label, sae_name=source.describe(), documents=documents)


@contextlib.contextmanager
def tiny_world_datasets(exp, world: Path, folder: Path, say):
    """SAEBench's labelled datasets generated from the tiny world (saecomp.saebench_data), logged as the run's
    `datasets/` artifact, and SAEBench's `load_dataset` pointed at them for the duration."""
    import mlflow

    from saecomp.saebench_data import offline_datasets, write_offline_datasets

    ev = exp.evaluation
    corpus = exp.world_config().corpus  # the world's own config (its key): the data is a pure function of it
    largest_train = max(ev.sparse_probing_train_size, ev.scr_tpp_train_size)
    largest_test = max(ev.sparse_probing_test_size, ev.scr_tpp_test_size)
    counts = write_offline_datasets(corpus, folder, largest_train // 4, largest_test // 4)
    say("labelled data from the tiny world: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    mlflow.log_artifacts(str(folder / "parquet"), "datasets")
    with offline_datasets(folder / "hf_datasets"):
        yield


if __name__ == "__main__":
    main()
