"""Look at an experiment the way a person does: the MLflow UI in a real (headless) Chromium.

    python tests/ui_check.py --experiment tiny --out experiment.png      # the store in ./mlflow.db
    python tests/ui_check.py --experiment small --store sqlite:////tmp/x/mlflow.db --out shot.png

Starts `mlflow ui` on a free loopback port over the store, opens the experiment's page and one prune_sae run's page,
saves a screenshot of each (``--out`` and ``<out>-run.png``) and checks the rendered pages: the experiment opens in
the model-training view ("Training runs", not GenAI's "Evaluations") and lists the pipeline run by its name (the
steps are nested under it), and the step's page shows its descriptive name and description. Exits non-zero, saying
what is wrong, otherwise. Needs Chromium (Debian: `apt-get install chromium`). A documented check, not part of the
test suite: it takes about a minute, and CI machines need not have a browser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infrastructure import free_port, wait_for  # noqa: E402

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell")


def chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def render(browser: str, url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran (and a screenshot of it)."""
    common = [
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000",
        "--virtual-time-budget=30000", f"--user-data-dir={tempfile.mkdtemp(prefix='saecomp-chromium-')}",
    ]  # fmt: skip
    subprocess.run([*common, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=180)
    return subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180).stdout


def check(experiment: str, store: str, out: Path) -> list[str]:
    """Problems found on the experiment's page (none: it looks right)."""
    import mlflow

    browser = chromium()
    if browser is None:
        return [f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)})"]
    client = mlflow.MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [f"the store {store} has no experiment {experiment!r}"]
    runs = client.search_runs([found.experiment_id], max_results=200)
    pipelines = [r for r in runs if r.data.tags.get("saecomp.step") == "pipeline"]
    steps = [r for r in runs if r.data.tags.get("saecomp.step") == "prune_sae"]
    if not pipelines or not steps:
        return [f"the experiment {experiment!r} has no pipeline run or no prune_sae run to look at"]
    step = steps[0]
    port = free_port()
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    run_shot = out.with_name(f"{out.stem}-run{out.suffix}")
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, seconds=120)
        page = f"http://127.0.0.1:{port}/#/experiments/{found.experiment_id}"
        experiment_dom = render(browser, f"{page}/runs", out)
        run_dom = render(browser, f"{page}/runs/{step.info.run_id}", run_shot)
    finally:
        server.terminate()
        server.wait(timeout=30)
    problems = []
    if found.tags.get("mlflow.experimentKind") != "custom_model_development":
        problems.append(f"experiment tag mlflow.experimentKind is {found.tags.get('mlflow.experimentKind')!r}")
    if "Training runs" not in experiment_dom:  # the model-training view's runs table (GenAI's would say Evaluations)
        problems.append("the experiment page is not the model-training runs table")
    if not any(r.info.run_name in experiment_dom for r in pipelines):
        problems.append(f"the pipeline run ({pipelines[0].info.run_name!r}) is not listed by its name")
    if step.info.run_name not in run_dom or " · " not in step.info.run_name:
        problems.append(f"the prune_sae run's page does not show its descriptive name {step.info.run_name!r}")
    note = step.data.tags.get("mlflow.note.content", "")
    if not note or note[:40] not in run_dom:
        problems.append("the prune_sae run's page does not show its description")
    for shot in (out, run_shot):
        if not shot.exists() or shot.stat().st_size < 10_000:
            problems.append(f"no real screenshot at {shot}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="tiny", help="the MLflow experiment (an experiment file's `name`)")
    parser.add_argument("--store", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--out", type=Path, default=Path("experiment.png"))
    args = parser.parse_args()
    problems = check(args.experiment, args.store, args.out)
    for problem in problems:
        print(f"ui_check: {problem}", file=sys.stderr)
    if not problems:
        print(f"ui_check: {args.experiment} renders as model training, runs named and described; screenshots at {args.out}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
