"""Pruned SAEs to the Hugging Face Hub in SAELens's layout, and the model card that says what they are.

A repository holds one folder per SAE, ``blocks.<layer>.<hook>/<method>-<sparsity>/`` with ``cfg.json`` and
``sae_weights.safetensors`` (SAELens's own files), so that ``SAE.from_pretrained("<repo>", "<sae_id>")`` loads it.
An SAE of a pruned model is only usable on that model: ``cfg.json``'s ``model_name`` becomes the base model's Hub id
(what TransformerLens loads the architecture by) and ``metadata.pruned_model`` says how that model was pruned, with
the exact saecomp command that rebuilds it, and the companion model repository when the checkpoint was pushed too.

A repository also holds ``saecomp.json``, the index of every SAE published there (what the card says of each). A later
publish to the same repository adds its SAEs to that index and rewrites the card from all of them, so publishing
layer by layer never loses what an earlier publish put there; replacing an SAE's own files, or a card someone edited
since saecomp wrote it, still needs ``overwrite``.

The token is never an argument here: ``huggingface_hub`` reads it (``HF_TOKEN`` or the login) itself, so it cannot
reach a log, a param or an artifact through this module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

SAE_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
"""SAELens's files of one SAE (the last only where the sparsity is known)."""
INDEX = "saecomp.json"
"""The repository's index of the SAEs published there; with the card, rewritten (merged) by every publish."""
REGENERATED = ("README.md", INDEX)


@dataclass
class PublishedSAE:
    """One SAE to publish: where it is on disk, its id in the repository, and where it comes from."""

    folder: Path | None  # None: already in the repository (from its index), nothing to upload
    sae_id: str  # blocks.<layer>.<hook>/<method>-<sparsity>
    pruned_model: dict  # base_model, method, sparsity, nm, calibration, rebuild_command, prune_llm_run, (repo)
    provenance: dict  # run ids, code version, experiment file
    selection: dict = field(default_factory=dict)  # selection.json of the prune_sae run (met or not)
    evaluation: dict[str, float] = field(default_factory=dict)  # headline metrics from the store


def sae_id_for(hook_name: str, method: str, sparsity: float) -> str:
    """``blocks.2.hook_resid_post/wanda-0.25``: the SAE's folder in the repository."""
    return f"{hook_name}/{method}-{sparsity:g}"


def pruned_layers(prune_params: dict) -> list[int] | None:
    """The blocks the prune_llm run pruned (its ``llm_pruning.layers`` param, logged as a Python list), or None: all.
    A run that logged ``[]`` pruned no block (refused since): its model is the dense one, which no pruning rebuilds."""
    logged = prune_params.get("llm_pruning.layers")
    if logged == "[]":
        raise ValueError("its prune_llm run pruned no block (llm_pruning.layers=[], refused since): the model is the dense one")
    if logged in (None, "", "None"):
        return None
    return [int(layer) for layer in str(logged).strip("[]").split(",")]


def rebuild_command(experiment: str, prune_params: dict) -> str:
    """The saecomp command that rebuilds the pruned model: ``experiment`` (the experiment file, which names the
    calibration text and seed) and the prune_llm run's own params: base model, method, sparsity or N:M, calibration
    sizes, layers and dtype."""
    parts = [f"mlflow run . -e prune_llm -P experiment={experiment}", f"-P model={prune_params.get('model')}"]
    parts.append(f"-P method={prune_params.get('method')}")
    nm = prune_params.get("nm")
    if nm and nm not in ("unstructured", "None"):
        parts.append(f"-P nm={nm}")
    else:
        parts.append(f"-P sparsity={prune_params.get('sparsity')}")
    if prune_params.get("calibration.n_sequences") not in (None, "None"):
        parts.append(f"-P calibration_sequences={prune_params['calibration.n_sequences']}")
    if prune_params.get("calibration.seq_len") not in (None, "None"):
        parts.append(f"-P seq_len={prune_params['calibration.seq_len']}")
    if layers := pruned_layers(prune_params):
        parts.append(f"-P layers={','.join(map(str, layers))}")  # prune_llm's --layers: comma-separated, no spaces
    if prune_params.get("dtype") not in (None, "None"):
        parts.append(f"-P dtype={prune_params['dtype']}")
    return " ".join(parts)


def index_of(saes: list[PublishedSAE], base_model: str) -> dict:
    """``saecomp.json``: per sae_id, what the card says of it."""
    entries = {
        sae.sae_id: {
            "pruned_model": sae.pruned_model,
            "provenance": sae.provenance,
            "selection": sae.selection,
            "evaluation": sae.evaluation,
        }
        for sae in saes
    }
    return {"format": 1, "base_model": base_model, "prune_llm_run": saes[0].pruned_model.get("prune_llm_run"), "saes": entries}


def already_published(index: dict | None, replaced_by: list[PublishedSAE]) -> list[PublishedSAE]:
    """The SAEs a repository's index lists, but those this publish puts there again (same sae_id)."""
    if not index:
        return []
    new = {sae.sae_id for sae in replaced_by}
    return [
        PublishedSAE(None, sae_id, e["pruned_model"], e["provenance"], e.get("selection", {}), e.get("evaluation", {}))
        for sae_id, e in index["saes"].items()
        if sae_id not in new
    ]


def published_index(repo_id: str) -> dict | None:
    """The repository's ``saecomp.json``, or None when the repository or the file does not exist. Its
    ``card_edited`` says whether the card is no longer the one saecomp wrote with it (someone edited it): then
    rewriting the card would lose their edit, and it counts as a clash."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        index = json.loads(Path(hf_hub_download(repo_id, INDEX)).read_text())
    except (RepositoryNotFoundError, EntryNotFoundError):
        return None
    try:
        card = Path(hf_hub_download(repo_id, "README.md")).read_bytes()
    except EntryNotFoundError:
        card = None
    index["card_edited"] = card is not None and hashlib.sha256(card).hexdigest() != index.get("card_sha256")
    return index


def stage(
    saes: list[PublishedSAE], repo_id: str, out: Path, base_model: str, card_extra: str = "", published: list[PublishedSAE] = ()
) -> dict[str, str]:
    """The repository's files as they will be uploaded, in ``out``: each SAE's SAELens files under its ``sae_id``
    (``cfg.json`` rewritten to name the base model and carry ``pruned_model``), the model card ``README.md`` and the
    index ``saecomp.json``, both over ``published`` (already in the repository) and ``saes``. Returns {path in repo:
    sha256}. ``out`` must not exist yet."""
    out.mkdir(parents=True)
    everything = sorted([*published, *saes], key=lambda sae: sae.sae_id)
    for sae in saes:
        target = out / sae.sae_id
        target.mkdir(parents=True)
        for name in SAE_FILES:
            if (sae.folder / name).exists():
                shutil.copyfile(sae.folder / name, target / name)
        cfg = json.loads((sae.folder / "cfg.json").read_text())
        metadata = cfg.setdefault("metadata", {})
        metadata["model_name"] = base_model  # `tiny-gpt2+prune_llm:<run id>` means nothing on the Hub
        metadata["pruned_model"] = sae.pruned_model
        metadata["saecomp"] = {"sae_id": sae.sae_id, **sae.provenance}
        (target / "cfg.json").write_text(json.dumps(cfg, indent=1))
    card = model_card(everything, repo_id, base_model, card_extra)
    (out / "README.md").write_text(card)
    index = {**index_of(everything, base_model), "card_sha256": hashlib.sha256(card.encode()).hexdigest()}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}


def model_card(saes: list[PublishedSAE], repo_id: str, base_model: str, extra: str = "") -> str:
    """The model card: Hub metadata, what the SAEs are, how the model was pruned, how the SAEs were pruned, their
    evaluation from the tracking store, how to load them, and their provenance."""
    lines = [
        "---",
        "library_name: saelens",
        f"base_model: {base_model}" if "/" in base_model or base_model == "gpt2" else f"# base model: {base_model} (saecomp's tiny world)",
        "tags:",
        "- sparse-autoencoder",
        "- saelens",
        "- pruning",
        "- saecomp",
        "---",
        "",
        f"# Pruned sparse autoencoders for a pruned {base_model}",
        "",
        f"Sparse autoencoders (SAEs) in SAELens's format, made with saecomp for **{base_model} after "
        "pruning** — not for the dense model. Each was trained on the dense model's activations and then pruned itself "
        "(its encoder and decoder), the way the paper *Transferability of SAEs for compressed models* proposes instead of "
        "training a new SAE on the pruned model.",
        "",
        "| sae_id | hook | SAE pruning | selection met | model pruning |",
        "|---|---|---|---|---|",
    ]
    for sae in saes:
        hook = sae.sae_id.split("/")[0]
        method, level = sae.sae_id.split("/")[1].rsplit("-", 1)
        met, selected = sae.selection.get("met"), sae.selection.get("selected")
        if selected is not None and float(level) != float(selected):  # the sweep's selection was another level
            met_text = f"not the selected level ({float(selected):g}; published because named explicitly)"
        else:
            met_text = "n/a" if met is None else "yes" if met else "no (published because named explicitly)"
        pm = sae.pruned_model
        amount = pm.get("nm") if pm.get("nm") not in (None, "", "unstructured", "None") else f"{pm.get('sparsity')}"
        lines.append(f"| `{sae.sae_id}` | `{hook}` | {method} at sparsity {level} | {met_text} | {pm.get('method')} {amount} |")
    lines += ["", "## The model they are made for", ""]
    for sae in saes[:1]:
        pm = sae.pruned_model
        structured = pm.get("nm") not in (None, "", "unstructured", "None")
        amount = f"N:M {pm.get('nm')}" if structured else f"sparsity {pm.get('sparsity')}"
        lines += [
            f"The base model `{base_model}` pruned with **{pm.get('method')}** ({amount}) on the attention and MLP weights of "
            f"{'blocks ' + ', '.join(map(str, pm['layers'])) + ' only' if pm.get('layers') else 'every block'}, "
            f"calibrated on {pm.get('calibration')}. Rebuild it with saecomp:",
            "",
            "```bash",
            pm.get("rebuild_command", ""),
            "```",
            "",
            f"(saecomp at git commit `{sae.provenance.get('git_commit', '?')}`; the experiment file names the calibration text and seed.)",
            "",
        ]
        if pm.get("repo"):
            lines += [f"The pruned checkpoint itself is in [`{pm['repo']}`](https://huggingface.co/{pm['repo']}).", ""]
    lines += ["## Evaluation (SAEBench, on the pruned model; from the tracking store)", ""]
    metrics = sorted({k for sae in saes for k in sae.evaluation if not k.endswith(".bootstrap_se")})

    def shown(sae: PublishedSAE, metric: str) -> str:
        if metric not in sae.evaluation:
            return "—"
        se = sae.evaluation.get(f"{metric}.bootstrap_se")
        return f"{sae.evaluation[metric]:.4f}" + (f" ± {se:.2g}" if se is not None else "")

    if metrics:
        lines += ["| sae_id | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        lines += [f"| `{sae.sae_id}` | " + " | ".join(shown(sae, m) for m in metrics) + " |" for sae in saes]
        if any(k.endswith(".bootstrap_se") for sae in saes for k in sae.evaluation):
            lines += ["", "± is one standard error, a bootstrap over core's test text (SAEBench core's metrics; what it resampled, "
                      "documents or, in older runs, windows, is in the evaluate run's `uncertainty/core.json`)."]
    else:
        lines.append("No finished evaluation of these SAEs in the store.")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{saes[0].sae_id}")',
        "```",
        "",
        f"or, in saecomp, `-P source={repo_id}:{saes[0].sae_id}` (`prune_sae`) and `-P sae={repo_id}:{saes[0].sae_id}` (`evaluate`).",
        "",
        "## Provenance",
        "",
    ]
    for sae in saes:
        lines.append(f"- `{sae.sae_id}`: " + ", ".join(f"{k} `{v}`" for k, v in sae.provenance.items()))
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def refuse_clashes(folder: Path, repo_id: str, overwrite: bool, merged: bool = False) -> list[str]:
    """The files of ``folder`` that ``repo_id`` already has; unless ``overwrite``, a FileExistsError naming them.
    Checked for every repository before anything is uploaded. ``merged``: the card and index were rebuilt from the
    repository's own index, so replacing them loses nothing and is no clash."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    if merged:
        files -= set(REGENERATED)
    try:
        existing = set(HfApi().list_repo_files(repo_id))
    except RepositoryNotFoundError:
        return []
    clashes = sorted(files & existing)
    if clashes and not overwrite:
        raise FileExistsError(
            f"{repo_id} already has {', '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}; "
            "valid: another repo, or overwrite=true to replace them"
        )
    return clashes


def upload(folder: Path, repo_id: str, private: bool, commit_message: str) -> dict:
    """Upload the staged ``folder`` to ``repo_id`` with the Hub client, whose token is its own (``HF_TOKEN`` or the
    login). A new repository is private unless ``private`` is False; an existing one keeps its visibility. Returns
    {repo_id, commit, url, files}."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return {"repo_id": repo_id, "commit": info.oid, "url": info.commit_url, "files": files}
