"""The pipeline's steps, each declared once: what it needs upstream, which code decides its result, what it asks of
a machine.

    world or model -> prune_llm -> train_sae (dense and pruned) -> prune_sae -> evaluate        per hook and layer
                                                                                 -> compare   once, over all cells
                                                                                 [-> publish  on request]

A step's key (``tracking.step_key``) hashes its resolved inputs, the ids of the upstream runs it used and the source
of the modules listed in ``code`` here: editing one of those files makes that step's finished runs stale, and only
the steps downstream of it run again (their keys hold the new upstream run ids). ``python -m saecomp.graph`` prints
this table; the README carries it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str
    needs: tuple[str, ...]  # upstream steps whose runs (ids) are inputs of this one
    code: tuple[str, ...]  # modules (or subpackages) of saecomp whose source is part of the key
    inputs: str  # the experiment fields and parameters in the key, in words
    gpu: bool  # runs its model on the experiment's device (a GPU task on Ray when that is CUDA)
    memory_gb: float  # host memory to ask for on a cluster, for the tiny world; real models need their own size
    per_cell: bool  # once per (hook, layer) cell rather than once per experiment


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step("build_world", (), ("world",), "world.*", gpu=False, memory_gb=2, per_cell=False),
        Step(
            "prune_llm",
            ("build_world",),
            ("models.py", "data.py", "saes.py", "prune_llm.py"),  # saes.py: the model processing wanda-seed prunes under
            "model, llm_pruning.*, calibration.*, held_out.*, device, dtype",
            gpu=True,
            memory_gb=4,
            per_cell=False,
        ),
        Step(
            "train_sae",
            ("build_world", "prune_llm"),
            ("models.py", "data.py", "saes.py", "train_sae.py"),
            "sae.* for its hook and layer, the base model (dense, or the prune_llm run), its training and validation "
            "pools (data.*; calibration.* and held_out.documents only as they move them), held_out.n_sequences, device, dtype",
            gpu=True,
            memory_gb=4,
            per_cell=True,
        ),
        Step(
            "prune_sae",
            ("prune_llm", "train_sae"),
            ("models.py", "data.py", "saes.py", "prune_llm.py", "prune_sae.py"),
            "sae_pruning.*, the pretrained and trained SAE runs, the prune_llm run, held_out.*, device, dtype",
            gpu=True,
            memory_gb=4,
            per_cell=True,
        ),
        Step(
            "evaluate",
            ("prune_llm", "prune_sae"),
            ("models.py", "data.py", "saes.py", "evaluate.py", "saebench_data.py"),
            "per suite: that suite's evaluation.* fields (config.SUITE_FIELDS), the SAE (its run or file digest) and the "
            "variant it is evaluated as, the model (its prune_llm run), the test pool (core), the world (tiny models), device, dtype",
            gpu=True,
            memory_gb=4,
            per_cell=True,
        ),
        Step(
            "compare",
            ("prune_llm", "prune_sae", "evaluate"),
            ("compare.py", "paper"),
            "the ids of the finished runs it reads and the tags that chose them",
            gpu=False,
            memory_gb=2,
            per_cell=False,
        ),
        Step(
            "publish",
            ("prune_llm", "prune_sae", "evaluate"),
            ("publish.py",),
            "never reused (an upload is an action): the repo, the SAEs and the flags are its params",
            gpu=False,
            memory_gb=2,
            per_cell=False,
        ),
    )
}


def downstream(step: str) -> list[str]:
    """The steps that rerun when ``step``'s result changes (its own name first)."""
    order = list(STEPS)
    found = [step]
    for name in order[order.index(step) + 1 :]:
        if any(need in found for need in STEPS[name].needs):
            found.append(name)
    return found


def markdown_table() -> str:
    """The steps as the README shows them: what reruns after an edit to which file."""
    rows = ["| step | needs | files of `saecomp/` in its key | keyed on | runs on |", "|---|---|---|---|---|"]
    for step in STEPS.values():
        files = ", ".join(f"`{c}/`" if "." not in c else f"`{c}`" for c in step.code)
        where = "the experiment's device" if step.gpu else "CPU"
        rows.append(f"| {step.name} | {', '.join(step.needs) or '—'} | {files} | {step.inputs} | {where} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
