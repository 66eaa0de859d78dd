"""What every entry point shares: reading the experiment, failing cleanly, finding upstream steps."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from saecomp.config import ConfigError, Experiment, load_experiment
from saecomp.names import TINY_MODELS

DEFAULT_EXPERIMENT = "experiments/tiny.yaml"


class StepCommand(click.Command):
    """A saecomp entry point. A command-line mistake that click itself finds (an unknown option, a value outside a
    choice) is one ``saecomp: error:`` line like every other bad input, not click's three-line usage block."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as error:
            fail(f"{error.format_message()} (`{ctx.command_path} --help` lists the options)")


def _remember(ctx: click.Context, param: click.Parameter, value):
    # Runtime overrides every step shares travel in the click context, so that `load` applies them.
    if value not in (None, ""):
        ctx.meta[f"saecomp.{param.name}"] = value


def experiment_option(command, runtime: bool = True):
    """``--experiment`` and the overrides every computing step takes: ``--device`` and ``--dtype`` (``runtime``; a step
    that only reads the store has no use for them). A tracking store that refuses the step wherever it is first met
    (``saecomp.tracking.StoreRefused``) is said in one line (``fail``)."""

    step = command

    @functools.wraps(step)
    def refused_in_one_line(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except KeyboardInterrupt:
            # Ctrl-C reaches every process of the terminal's group: the step that started this one says it once.
            from saecomp.tracking import launched_by_saecomp

            if not launched_by_saecomp():
                click.echo("\nAborted. Finished steps are kept; the same command resumes from them.", err=True)
            sys.exit(1)  # as click's own Abort
        except ValueError as error:
            tracking = sys.modules.get("saecomp.tracking")  # not imported: not what it raises
            if tracking is not None and isinstance(error, tracking.StoreRefused):
                fail(str(error))
            raise

    command = refused_in_one_line
    if not runtime:
        return click.option(
            "--experiment",
            default=DEFAULT_EXPERIMENT,
            show_default=True,
            help="Experiment file (experiments/*.yaml) whose MLflow experiment is read.",
        )(command)
    command = click.option("--dtype", expose_value=False, callback=_remember, help="float32, bfloat16 or float16 (default: the file's).")(
        command
    )
    command = click.option(
        "--device", expose_value=False, callback=_remember, help="cpu, cuda, cuda:<index> or mps (default: the file's)."
    )(command)
    return click.option(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        show_default=True,
        help="Experiment file (experiments/*.yaml); the options below override single fields of it.",
    )(command)


def store_reading_option(command):
    """``--experiment`` alone, for the steps that only read the tracking store (compare, publish)."""
    return experiment_option(command, runtime=False)


def runtime_overrides() -> dict[str, str]:
    """The ``--device``/``--dtype`` given to the running entry point, as parameters for the steps it starts."""
    context = click.get_current_context(silent=True)
    meta = context.meta if context else {}
    return {name: meta[f"saecomp.{name}"] for name in ("device", "dtype") if f"saecomp.{name}" in meta}


def pruning_label(exp: Experiment) -> str:
    """How the experiment prunes its model, for run names: ``tiny-gpt2 wanda 50%`` or ``gpt2 wanda 2:4``."""
    amount = exp.llm_pruning.nm or f"{exp.llm_pruning.sparsity * 100:g}%"
    return f"{exp.model} {exp.llm_pruning.method} {amount}"


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit, before any compute. Under `mlflow run`, whose run exists before
    the step can check its input (MLflow closes it FAILED), that run also says why, in the UI: a tag and its
    description."""
    click.echo(f"saecomp: error: {message}", err=True)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        import contextlib

        from mlflow import MlflowClient

        with contextlib.suppress(Exception):  # the line above said it; a store that refuses the tag must not hide that
            client = MlflowClient()
            client.set_tag(run_id, "saecomp.error", message[:4000])
            before = client.get_run(run_id).data.tags.get("mlflow.note.content")  # a description the run had: kept below
            note = f"Stopped before any compute, on bad input: {message}"
            client.set_tag(run_id, "mlflow.note.content", f"{note}\n\n{before}" if before else note)
    sys.exit(2)


def load(
    path: str,
    overrides: dict[str, object],
    check_device: bool = True,
    check_store: bool | None = None,
    writes: bool = True,
    reads_the_hub: bool = True,
) -> Experiment:
    """The experiment with the given overrides (``None`` values are 'not given'), or a clean exit. ``check_store``
    (default: as ``check_device``) refuses a store where the experiment's artifacts would land in this directory
    (``check_artifact_store``); under `mlflow run`, whose run MLflow has placed already, it warns instead. A tracking
    server that refuses this client, or (``writes``: the step makes runs) its runs in the experiment, is refused in one
    line (``check_tracking_access``). A step that ``reads_the_hub`` for a Hub model on a machine that cannot reach the
    Hub reads the Hugging Face cache only, and says so (``read_the_cache_when_the_hub_is_unreachable``)."""
    given = {**runtime_overrides(), **{key: value for key, value in overrides.items() if value not in (None, "")}}
    try:
        exp = load_experiment(path, given)
    except ConfigError as error:
        fail(str(error))
    from saecomp.names import check_device as device_here
    from saecomp.names import read_the_cache_when_the_hub_is_unreachable

    if reads_the_hub and exp.model not in TINY_MODELS and (hub_cache_only := read_the_cache_when_the_hub_is_unreachable()):
        click.echo(f"saecomp: warning: {hub_cache_only}", err=True)
    from saecomp.tracking import check_artifact_store, check_tracking_access, mark_launched, placed_artifacts_warning

    try:
        check_tracking_access(exp.name, write=writes)
        if writes and os.environ.get("MLFLOW_RUN_ID"):  # the run MLflow made for this step: whose it is, until the step opens it
            mark_launched(os.environ["MLFLOW_RUN_ID"], beat=True)
        if check_device:
            device_here(exp.device)
        if check_device if check_store is None else check_store:
            placed_by_mlflow_run = os.environ.get("MLFLOW_RUN_ID")
            if not placed_by_mlflow_run:
                check_artifact_store(exp.name)
            elif warning := placed_artifacts_warning(placed_by_mlflow_run):
                click.echo(f"saecomp: warning: {warning}", err=True)  # too late to refuse: MLflow made the run already
    except ValueError as error:
        fail(str(error))
    return exp


def world_needed(exp: Experiment):
    """The part of the experiment's tiny world that it uses: the corpus, the tokenizer and its own model. The other
    models of `world.models` are built by the experiments that use them (each in a world run of its own, with the
    same corpus and tokenizer), so no experiment waits for a model it never reads."""
    return exp.world_config().only(exp.model)


def world_step(exp: Experiment, experiment_path: str) -> tuple[str, str]:
    """(key, parameters) identifying the tiny world an experiment needs."""
    from saecomp.tracking import step_key

    # The model goes along: a step run with another model than the file's (`--model tiny-gemma2`) needs that one built.
    return step_key("build_world", world_needed(exp).to_dict()), {"experiment": experiment_path, "model": exp.model}


def resolve_world(exp: Experiment, experiment_path: str) -> Path:
    """The local directory of the tiny world, building it (its own tracked run) if no finished run exists."""
    from saecomp.tracking import local_artifacts, run_step

    key, parameters = world_step(exp, experiment_path)
    return local_artifacts(run_step("build_world", parameters, key, exp.name), "world")


def model_source(exp: Experiment, experiment_path: str) -> tuple[str | None, Path | None]:
    """(checkpoint directory or None for a Hub name, world directory or None)."""
    if exp.model in TINY_MODELS:
        world = resolve_world(exp, experiment_path)
        return world / exp.model, world
    if Path(exp.model).is_dir():
        return Path(exp.model), None
    return None, None


def flat_params(data: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params with dotted names (values cut to MLflow's 6000 chars)."""
    params: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = str(value)[:6000]
    return params


def model_dims(exp: Experiment):
    """The base model's shape from configuration alone (nothing is built or downloaded but a config)."""
    from saecomp.names import ModelDims, hf_model_dims

    if exp.model in TINY_MODELS:
        return ModelDims.from_tiny(exp.world_config().models[exp.model])
    try:
        return hf_model_dims(exp.model)
    except ValueError as error:
        fail(str(error))


def resolve_base(exp: Experiment, experiment_path: str, base: str, name: str = "base") -> tuple[Path | None, str, str | None]:
    """(checkpoint directory or None for a Hub name, a model name that identifies it, prune_llm run id or None).

    ``base``: ``dense``, ``pruned`` (the experiment's prune_llm run, run now if no finished one matches), or
    the id of a FINISHED prune_llm run (checked, never computed; errors call the value ``name``).
    """
    if base == "dense":
        checkpoint, _ = model_source(exp, experiment_path)
        return checkpoint, exp.model, None
    from saecomp.tracking import STEP_TAG, local_artifacts, run_step

    if base == "pruned":
        from entrypoints.prune_llm import key_for

        run_id = run_step("prune_llm", {"experiment": experiment_path, **runtime_overrides()}, key_for(exp, experiment_path), exp.name)
    else:
        import mlflow

        try:
            run = mlflow.MlflowClient().get_run(base)
        except Exception:
            fail(f"{name}={base!r} is not valid; valid: pruned, dense, or the id of a finished prune_llm run")
        if run.data.tags.get(STEP_TAG) != "prune_llm" or run.info.status != "FINISHED":
            fail(f"{name}={base!r} is not a finished prune_llm run (step {run.data.tags.get(STEP_TAG)}, {run.info.status})")
        if run.data.params.get("model") != exp.model:
            fail(f"{name}={base!r} pruned {run.data.params.get('model')}, not the experiment's model {exp.model}")
        run_id = base
    return local_artifacts(run_id, "pruned_model"), f"{exp.model}+prune_llm:{run_id}", run_id


def load_source(name: str, source):
    """(parsed source, SAE), or a clean exit naming the value if it is no loadable SAE."""
    from saecomp.names import SAESource

    try:
        parsed = SAESource.parse(source)  # before SAELens is imported (seconds): a malformed or missing source fails at once
        from saecomp.saes import load_sae

        return parsed, load_sae(parsed)
    except SystemExit:
        raise
    except Exception as error:  # a missing run, artifact or file: the user named something that is no SAE
        fail(f"{name}={source!r} is not a loadable SAE ({str(error).splitlines()[0][:300]})")
