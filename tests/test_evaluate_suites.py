"""evaluate's probing suites: SAEBench's own SCR, TPP, sparse probing and absorption, on the tiny world's labelled data,
on the model we pass (the pruned one)."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import sys
import time
from pathlib import Path

import datasets.config
import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from sae_lens import SAE

from entrypoints import evaluate as evaluate_step
from saecomp import evaluate as evaluate_lib
from saecomp.config import load_experiment
from saecomp.evaluate import NotApplicable, flat_hook_z, repeated_inputs_cached, run_suite, saebench_config
from saecomp.models import load_model
from saecomp.prune_llm import PruneSpec, prune_model
from saecomp.saebench_data import AMAZON, BIAS_IN_BIOS, offline_datasets, write_offline_datasets


def topk_sae(hook_name: str, d_in: int = 32, seed: int = 0) -> SAE:
    sae = SAE.from_dict({"architecture": "topk", "d_in": d_in, "d_sae": 4 * d_in, "k": 8, "metadata": {"hook_name": hook_name}})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return sae


@pytest.fixture(scope="module")
def experiment(small_experiment):
    return load_experiment(small_experiment)


@pytest.fixture(scope="module")
def pruned(small_world):
    loaded = load_model("tiny-gpt2", small_world / "tiny-gpt2")
    calibration = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    prune_model(loaded.tl, calibration, PruneSpec("wanda", 0.5))
    loaded.tl.cfg.model_name = "tiny-gpt2-pruned-test"
    return loaded


@pytest.fixture(scope="module")
def offline_data(experiment, tmp_path_factory):
    ev = experiment.evaluation
    folder = tmp_path_factory.mktemp("saebench_data")
    per_quadrant = (
        max(ev.sparse_probing_train_size, ev.scr_tpp_train_size) // 4,
        max(ev.sparse_probing_test_size, ev.scr_tpp_test_size) // 4,
    )
    write_offline_datasets(experiment.world_config().corpus, folder, *per_quadrant)
    return folder


def test_datasets_load_under_saebench_names_offline_and_deterministically(experiment, offline_data, tmp_path):
    from datasets import load_dataset
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
    from sae_bench.sae_bench_utils import dataset_info

    before = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE)
    with offline_datasets(offline_data / "hf_datasets"):
        bios = load_dataset(BIAS_IN_BIOS)
        reviews = load_dataset(AMAZON)
    assert (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE) == before  # restored
    assert set(bios["train"].column_names) == {"hard_text", "profession", "gender"}
    assert set(reviews["test"].column_names) == {"text", "category", "rating"}
    # SAEBench's own class sets and SCR pairs select tiny-world data by their names
    chosen = {c for name, classes in dataset_info.chosen_classes_per_dataset.items() if "bias_in_bios" in name for c in classes}
    assert chosen <= {str(p) for p in set(bios["train"]["profession"])}
    pairs = ScrAndTppEvalConfig().column1_vals_lookup
    for a, b in pairs["LabHC/bias_in_bios_class_set1"]:
        assert {dataset_info.profession_dict[a], dataset_info.profession_dict[b]} <= set(bios["test"]["profession"])
    for a, b in pairs[AMAZON]:
        assert {dataset_info.amazon_category_dict[a], dataset_info.amazon_category_dict[b]} <= set(reviews["train"]["category"])
    assert set(reviews["train"]["rating"]) == {1.0, 5.0}
    # the spurious correlation SCR removes is the world's
    typical = {"male": {21, 1, 25, 2, 0, 6, 9, 19}}
    rows = list(zip(bios["train"]["profession"], bios["train"]["gender"], strict=True))
    male_typical = sum((p in typical["male"]) == (g == 0) for p, g in rows) / len(rows)
    assert abs(male_typical - experiment.world_config().corpus.profession_gender_correlation) < 0.03
    # a pure function of the world's config
    write_offline_datasets(experiment.world_config().corpus, tmp_path, 16, 8)
    for name in ("LabHC__bias_in_bios", "canrager__amazon_reviews_mcauley_1and5"):
        first = pq.read_table(offline_data / "parquet" / name / "test.parquet")
        again = pq.read_table(tmp_path / "parquet" / name / "test.parquet")
        assert first.slice(0, again.num_rows).equals(again.slice(0, first.num_rows))


def test_the_labels_are_real(offline_data):
    """A bag-of-words probe reads each label far above chance: the texts carry what the labels say."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    for name, text, labels, floor in (
        ("LabHC__bias_in_bios", "hard_text", "profession", 0.9),
        ("LabHC__bias_in_bios", "hard_text", "gender", 0.95),
        ("canrager__amazon_reviews_mcauley_1and5", "text", "category", 0.95),
        ("canrager__amazon_reviews_mcauley_1and5", "text", "rating", 0.95),
    ):
        train = pq.read_table(offline_data / "parquet" / name / "train.parquet").to_pandas()
        test = pq.read_table(offline_data / "parquet" / name / "test.parquet").to_pandas()
        words = CountVectorizer().fit(train[text])
        probe = LogisticRegression(max_iter=500).fit(words.transform(train[text]), train[labels])
        accuracy = probe.score(words.transform(test[text]), test[labels])
        chance = test[labels].value_counts(normalize=True).max()
        assert accuracy > floor > chance + 0.3, (name, labels, accuracy, chance)


@pytest.mark.parametrize("suite", ["sparse_probing", "scr", "tpp"])
def test_probing_suites_write_saebench_json_with_finite_numbers(experiment, pruned, offline_data, tmp_path, suite):
    """SAEBench's own suite on the pruned model; its JSON validates against SAEBench's output class (run_suite)."""
    config = saebench_config(suite, experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    with offline_datasets(offline_data / "hf_datasets"):
        result = run_suite(suite, pruned.tl, topk_sae("blocks.1.hook_resid_post"), config, tmp_path, "random")
    assert result.metrics and all(name.startswith(f"{suite}.") for name in result.metrics)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.output["eval_type_id"] == suite and result.output["eval_config"]["model_name"] == "tiny-gpt2-pruned-test"
    if suite == "sparse_probing":
        assert len(result.output["eval_result_details"]) == len(experiment.evaluation.sparse_probing_datasets)
        check_sparse_probing_standard_errors(result, config, offline_data)
    if suite in ("scr", "tpp"):
        n_values = experiment.evaluation.scr_tpp_n_values
        # one number per n asked for (SCR's scr_metric needs the two clean accuracies to differ, which a
        # near-random model need not give; dir1/dir2 are always there)
        names = [f"scr.scr_dir1_threshold_{n}" if suite == "scr" else f"tpp.tpp_threshold_{n}_total_metric" for n in n_values]
        assert set(names) <= set(result.metrics)


def check_sparse_probing_standard_errors(result, config, offline_data) -> None:
    """Every sparse-probing accuracy SAEBench reports carries a bootstrap standard error over the texts its probes were
    tested on, traced text by text: the class sizes counted here independently from SAEBench's own data split (2 x
    each class's test texts), each dataset's entries those texts, and the top-k probes' errors of the order of the closed
    form's (independent binomials per class: the classes' tests share texts, so not equal)."""
    import numpy as np
    from sae_bench.sae_bench_utils import dataset_info, dataset_utils

    with offline_datasets(offline_data / "hf_datasets"):
        expected_n = {}
        for name in config.dataset_names:
            _, test = dataset_utils.get_multi_label_train_test_data(
                name, config.probe_train_set_size, config.probe_test_set_size, config.random_seed
            )
            test = dataset_utils.filter_dataset(test, dataset_info.chosen_classes_per_dataset[name])
            expected_n[f"{name}_results"] = {str(c): 2 * len(texts) for c, texts in test.items()}
    uncertainty = result.uncertainty
    assert uncertainty["se_kind"] == "bootstrap_se" and "untraced" not in uncertainty, uncertainty.get("untraced")
    assert "saecomp.sparse_probing.se_untraced" not in result.tags
    assert uncertainty["n_test"] == expected_n
    for dataset, sizes in expected_n.items():
        texts = uncertainty["texts"][dataset]
        assert texts["entries"] == sum(sizes.values()) // 2 and 0 < texts["texts"] <= texts["entries"]
    per_class = result.output["eval_result_unstructured"]
    accuracies = [name.removeprefix("sparse_probing.") for name in result.metrics if name.endswith("_accuracy")]
    assert accuracies and set(uncertainty["se"]) == set(accuracies) == set(uncertainty["samples"])
    ratios = []
    for metric in accuracies:
        se = result.metrics[f"sparse_probing.{metric}.bootstrap_se"]
        assert se == uncertainty["se"][metric] and len(uncertainty["samples"][metric]) == uncertainty["replicates"]
        mean = sum(sum(d[metric].values()) / len(d[metric]) for d in per_class.values()) / len(per_class)
        assert result.metrics[f"sparse_probing.{metric}"] == pytest.approx(mean, rel=1e-12)  # the SE is of this number
        assert (se > 0) == any(0 < p < 1 for d in per_class.values() for p in d[metric].values())
        independent = math.sqrt(
            sum(
                p * (1 - p) / expected_n[dataset][c] / len(per_class[dataset][metric]) ** 2 / len(per_class) ** 2
                for dataset in per_class
                for c, p in per_class[dataset][metric].items()
            )
        )
        if independent > 0 and "_top_" in metric:  # one test per probe (a GPU probe's best of its epochs spreads less)
            ratios.append(se / independent)
    # measured 1.15-1.38: a text one probe gets wrong, the other classes' probes reading it tend to get wrong too
    assert ratios and 0.8 < float(np.median(ratios)) < 2.0, ratios


@pytest.mark.parametrize("suite", ["scr", "tpp", "sparse_probing"])
def test_saes_sharing_the_model_side_get_exactly_the_numbers_of_a_fresh_run(experiment, pruned, offline_data, tmp_path, monkeypatch, suite):
    """The pipeline's SAEs on one model and hook share the suite's model-side work (activations and probes), as
    SAEBench's run_eval does for its SAE list: the SAE that loads it scores exactly as if it had computed it, though
    another SAE computed it, over several datasets (SCR: class pairs). The SAE sides draw random numbers after the
    model side, so this holds only from the generators' state the computing run recorded (`per_dataset_random_state`):
    without it TPP's and sparse probing's numbers move (SCR's draws only reorder its texts)."""
    from saecomp.saebench_data import default_datasets

    config = saebench_config(suite, experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    if suite != "scr":  # two datasets, so that a second one's SAE side starts from a recorded state too
        field = "scr_tpp_datasets" if suite == "tpp" else "sparse_probing_datasets"
        config = evaluate_lib._copy_config(config, dataset_names=default_datasets(field, tiny=True)[-2:])
    shared = tmp_path / "shared"
    hook = "blocks.1.hook_resid_post"
    with offline_datasets(offline_data / "hf_datasets"):
        first = run_suite(suite, pruned.tl, topk_sae(hook, seed=1), config, tmp_path / "a", "first", shared=shared)
        (published,) = list(shared.iterdir())  # one complete keyed folder, no staging folder left behind
        assert not published.name.startswith(".") and any(f.name.endswith("_activations.pt") for f in published.iterdir())
        assert first.tags[f"saecomp.{suite}.model_side"].startswith("computed by this run and shared")
        written = {f.name: f.stat().st_mtime_ns for f in published.iterdir()}
        assert sum(f.stat().st_size for f in published.iterdir()) <= evaluate_lib.model_side_bytes(config, 32)  # its bound
        reused = run_suite(suite, pruned.tl, topk_sae(hook, seed=2), config, tmp_path / "b", "second", shared=shared)
        assert {f.name: f.stat().st_mtime_ns for f in published.iterdir()} == written  # only loaded
        assert reused.tags[f"saecomp.{suite}.model_side"].startswith("loaded from")
        fresh = run_suite(suite, pruned.tl, topk_sae(hook, seed=2), config, tmp_path / "c", "second")
        run_suite(suite, pruned.tl, topk_sae("blocks.0.hook_resid_post", seed=2), config, tmp_path / "d", "other", shared=shared)
        assert len(list(shared.iterdir())) == 2  # another hook reads other activations: its own folder
        for part in ("eval_result_metrics", "eval_result_details", "eval_result_unstructured"):
            assert reused.output[part] == fresh.output[part], part
        assert reused.metrics == fresh.metrics  # SCR's and TPP's padding-masked values too
        assert first.output["eval_result_details"] != reused.output["eval_result_details"]  # the SAE side is each SAE's own
        # the same texts, so the same resamples of them: compare pairs the two SAEs
        assert first.uncertainty["sample_id"] == reused.uncertainty["sample_id"] == fresh.uncertainty["sample_id"]
        assert first.uncertainty["samples"] != reused.uncertainty["samples"] == fresh.uncertainty["samples"]
        states = published / evaluate_lib.RANDOM_STATES_FILE
        assert len(torch.load(states, weights_only=False)) >= 2  # one state per SAE-side start, several datasets
        # the loading run's traced errors need the computing run's answers and texts
        assert reused.uncertainty["se_kind"] == "bootstrap_se" and f"saecomp.{suite}.se_untraced" not in reused.tags
        kept_file = evaluate_lib.MODEL_PROBE_OUTCOMES_FILE if suite == "sparse_probing" else evaluate_lib.CLEAN_OUTCOMES_FILE
        outcomes = published / kept_file
        kept = outcomes.read_bytes()
        for damage in ("missing", "truncated"):  # costs only the traced errors: SAEBench's numbers stand, the run says why
            outcomes.unlink() if damage == "missing" else outcomes.write_bytes(kept[: len(kept) // 2])
            with pytest.warns(UserWarning, match="could not be traced"):
                fallen = run_suite(suite, pruned.tl, topk_sae(hook, seed=2), config, tmp_path / damage, "second", shared=shared)
            assert fallen.output["eval_result_metrics"] == fresh.output["eval_result_metrics"]
            assert {k: v for k, v in fallen.metrics.items() if not k.endswith("_se")} == {
                k: v for k, v in fresh.metrics.items() if not k.endswith("_se")
            }
            assert fallen.uncertainty.get("se_kind", "binomial_se") == "binomial_se" and fallen.tags[f"saecomp.{suite}.se_untraced"]
            assert fallen.uncertainty.get("sample_id") != fresh.uncertainty["sample_id"]  # never paired with a traced run
            assert ("delete that folder" in fallen.tags[f"saecomp.{suite}.se_untraced"]) == (damage == "missing")  # the remedy
        outcomes.write_bytes(kept)
        if suite != "scr":  # the numbers depend on the state handed over (SCR's draws only reorder texts)
            states = published / evaluate_lib.RANDOM_STATES_FILE
            recorded = states.read_bytes()
            states.unlink()
            with pytest.raises(FileNotFoundError):  # a folder without the states is refused, not silently used
                run_suite(suite, pruned.tl, topk_sae(hook, seed=2), config, tmp_path / "e", "second", shared=shared)
            torch.save([], states)  # nor is one that recorded fewer SAE-side starts than this run makes
            with pytest.raises(RuntimeError, match="records 0 SAE-side starts"):
                run_suite(suite, pruned.tl, topk_sae(hook, seed=2), config, tmp_path / "e", "second", shared=shared)
            states.write_bytes(recorded)
            monkeypatch.setattr(evaluate_lib, "_set_random_state", lambda state: None)  # loads the states, sets none
            unpinned = run_suite(suite, pruned.tl, topk_sae(hook, seed=2), config, tmp_path / "f", "second", shared=shared).output
            assert unpinned["eval_result_details"] != fresh.output["eval_result_details"]


def test_a_model_side_the_disk_may_not_hold_is_computed_privately(experiment, pruned, tmp_path):
    """SAEBench's saved model side runs to tens of GB at GPT-2 small's sizes: where the shared folder's disk lacks the
    room its bound asks for, the run computes its own and shares (and writes there) nothing, rather than fail."""
    import shutil

    config = saebench_config("tpp", experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    shared, private = tmp_path / "shared", tmp_path / "private"
    free = shutil.disk_usage(tmp_path).free
    with evaluate_lib.model_side_folder(shared, config, "blocks.1.hook_resid_post", "cpu", private, free) as side:
        assert side.folder == private and not side.save and side.computing and "not shared" in side.origin
    assert not list(shared.iterdir())
    with evaluate_lib.model_side_folder(shared, config, "blocks.1.hook_resid_post", "cpu", private, 1 << 20) as side:
        assert side.folder.parent == shared and side.save and side.computing
    gpt2_small = evaluate_lib._copy_config(config, train_set_size=4000, test_set_size=1000, context_length=128)
    assert evaluate_lib.model_side_bytes(gpt2_small, 768) > 1e9 * len(config.dataset_names)  # SAEBench's sizes: GBs


@pytest.mark.parametrize("suite", ["tpp", "sparse_probing"])
def test_every_dataset_scores_as_saebench_scores_it(experiment, pruned, offline_data, tmp_path, suite):
    """Over several datasets, bit for bit: TPP's numbers are those of SAEBench's own run_eval_single_sae on the same
    datasets (its draws do not depend on the SAE, so its one generator is kept); sparse probing's are those of
    SAEBench on each dataset alone (`MODEL_SIDE_RESEEDED`), since its probes on the latents stop early, so that in
    SAEBench's one generator the next dataset's model probes would depend on the SAE before it."""
    import random

    import numpy as np
    from sae_bench.evals.scr_and_tpp.main import run_eval_single_sae as scr_tpp_single_sae
    from sae_bench.evals.sparse_probing.main import run_eval_single_sae as sparse_probing_single_sae

    from saecomp.saebench_data import default_datasets

    config = saebench_config(suite, experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    field = "scr_tpp_datasets" if suite == "tpp" else "sparse_probing_datasets"
    config = evaluate_lib._copy_config(config, dataset_names=default_datasets(field, tiny=True)[-2:])  # two kinds of text
    hook = "blocks.1.hook_resid_post"
    single_sae = scr_tpp_single_sae if suite == "tpp" else sparse_probing_single_sae
    with offline_datasets(offline_data / "hf_datasets"):
        ours = run_suite(suite, pruned.tl, topk_sae(hook, seed=3), config, tmp_path / "ours", "sae")
        details = {d["dataset_name"]: d for d in ours.output["eval_result_details"]}
        runs = [config] if suite == "tpp" else [evaluate_lib._copy_config(config, dataset_names=[n]) for n in config.dataset_names]
        expected = {}
        for i, saebench_config_run in enumerate(runs):
            random.seed(config.random_seed)
            np.random.seed(config.random_seed)
            torch.manual_seed(config.random_seed)
            sae = evaluate_lib.prepared_for_saebench(topk_sae(hook, seed=3), config.model_name)
            with torch.enable_grad():
                results, _ = single_sae(saebench_config_run, sae, pruned.tl, "cpu", str(tmp_path / f"saebench{i}"), save_activations=False)
            expected.update({k: v for k, v in results.items() if isinstance(v, dict)})  # per dataset
    assert len(expected) == 2
    for key, numbers in expected.items():
        assert {k: details[key][k] for k in numbers} == numbers, key


def test_two_saes_on_one_model_share_their_clean_accuracies_draws_and_not_their_ablated_ones():
    """SCR's and TPP's bootstrap, as compare pairs it: two SAEs on one model have the same clean accuracies (the
    model's probes on its own texts), so every replicate draws them the same and a replicate-wise difference leaves
    their error out; each SAE's ablated accuracies are drawn independently of the other's. TPP's
    ``intended_diff_only`` is the mean over classes of clean minus ablated, so the difference between two SAEs is
    the mean of their ablated accuracies' differences, whose standard error is known in closed form. Drawing the
    clean accuracies apart would add theirs twice; drawing the ablated ones from one stream would couple them (their
    accuracies are close here, so the difference would nearly vanish)."""
    import numpy as np

    classes, n, key = ["0", "1", "2"], 40, "tiny_tpp_results"
    clean = {"0": 0.6, "1": 0.55, "2": 0.7}  # far from 0 and 1: the clean accuracies' error is the larger part

    def run(ablated: float, clean=clean) -> dict:  # TPP's raw: ablated class -> k -> measured class -> accuracy
        accuracy = {c: {u: round(ablated - 0.05 * (u == c) + 0.01 * classes.index(u), 3) for u in classes} for c in classes}
        raw = {c: {k: dict(accuracy[c]) for k in (2, 20)} for c in classes}
        return {"raw": raw, "clean": dict(clean), "n_test": {c: n for c in classes}}

    first, second = run(0.9), run(0.88)
    a = evaluate_lib.scr_tpp_uncertainty("tpp", [key], [first])
    b = evaluate_lib.scr_tpp_uncertainty("tpp", [key], [second])
    assert a["sample_id"] == b["sample_id"] and a["seed"] == b["seed"] and a["replicates"] == b["replicates"] == 1000
    assert evaluate_lib.scr_tpp_uncertainty("tpp", [key], [run(0.9)])["samples"] == a["samples"]  # a rerun draws the same
    assert evaluate_lib.scr_tpp_uncertainty("tpp", [key], [run(0.9, {**clean, "2": 0.65})])["sample_id"] != a["sample_id"]

    metric = "tpp_threshold_2_intended_diff_only"
    differences = np.array(a["samples"][metric], dtype=float) - np.array(b["samples"][metric], dtype=float)

    def variance(p: float) -> float:
        return p * (1 - p) / n

    ablated_only = math.sqrt(sum(variance(r["raw"][c][2][c]) for r in (first, second) for c in classes)) / len(classes)
    assert float(differences.std(ddof=1)) == pytest.approx(ablated_only, rel=0.1)
    each = math.sqrt(sum(variance(clean[c]) + variance(first["raw"][c][2][c]) for c in classes)) / len(classes)
    assert a["se"][metric] == pytest.approx(each, rel=0.1)  # one SAE's own error still counts its clean accuracies
    unpaired = math.hypot(a["se"][metric], b["se"][metric])
    assert ablated_only < 0.7 * unpaired  # what pairing gains here (0.59 of it)
    assert all(len(values) == 1000 for values in a["samples"].values())
    # Two SAEs whose ablated accuracies happen to be equal still draw them independently (their identities differ):
    # their difference keeps its error rather than being exactly zero in every replicate; the same SAE draws the same
    same, other = (evaluate_lib.scr_tpp_uncertainty("tpp", [key], [run(0.9)], sae_identity=name)["samples"][metric] for name in "ab")
    independent = math.sqrt(2 * sum(variance(first["raw"][c][2][c]) for c in classes)) / len(classes)
    assert float(np.std(np.array(same) - np.array(other), ddof=1)) == pytest.approx(independent, rel=0.1)
    assert evaluate_lib.scr_tpp_uncertainty("tpp", [key], [run(0.9)], sae_identity="a")["samples"][metric] == same
    # what decides which texts were tested (SAEBench's seed) is part of what the clean accuracies are drawn from
    assert evaluate_lib.scr_tpp_uncertainty("tpp", [key], [run(0.9)], drawn_from={"random_seed": 43})["sample_id"] != a["sample_id"]


@pytest.mark.parametrize("perform_scr", [False, True])
def test_a_traced_probe_test_names_the_texts_each_probe_read_and_leaves_saebench_unchanged(monkeypatch, perform_scr):
    """`evaluate._traced_probe_tests` around SAEBench's own `get_probe_test_accuracy` (TPP's classes, or SCR's paired
    ones with its "X probe on Y data" tests), on pools of unequal sizes: each traced text is exactly the activation row
    the probe read, the positives are the tested class's whole pool, each answer is the probe's own, and SAEBench's
    accuracies and the random state after the call (its negatives and shuffles) are those of an untraced call."""
    import numpy as np
    from sae_bench.evals.scr_and_tpp import main as scr_tpp
    from sae_bench.evals.sparse_probing import probe_training
    from sae_bench.sae_bench_utils import dataset_info

    if perform_scr:
        chosen = list(dataset_info.PAIRED_CLASS_KEYS)
        paired_with = list(dataset_info.PAIRED_CLASS_KEYS.values())
        sizes = {key: 18 + 3 * i for i, key in enumerate(chosen)} | {v: 18 + 3 * i for i, v in enumerate(paired_with)}
    else:
        chosen = ["0", "1", "2", "6"]
        sizes = {key: 20 + 3 * i for i, key in enumerate(chosen)}
    generator = torch.Generator().manual_seed(1)
    acts = {key: torch.randn(n, 8, generator=generator) for key, n in sizes.items()}  # [texts, d]
    torch.manual_seed(5)
    probes = {key: probe_training.Probe(8, torch.float32) for key in chosen}
    state = torch.get_rng_state()
    with contextlib.redirect_stdout(io.StringIO()):
        plain = scr_tpp.get_probe_test_accuracy(probes, chosen, acts, 7, perform_scr)
    plain_after = torch.get_rng_state()
    torch.set_rng_state(state)
    read, tests = [], []  # what SAEBench's test reads (a spy inside the tracing); what the tracing records
    test, prepare = probe_training.test_probe_gpu, probe_training.prepare_probe_data
    spy = lambda x, y, b, probe: read.append((x.clone(), y.clone(), probe)) or test(x, y, b, probe)  # noqa: E731
    monkeypatch.setattr(probe_training, "test_probe_gpu", spy)
    with evaluate_lib._traced_probe_tests(tests), contextlib.redirect_stdout(io.StringIO()):
        traced = scr_tpp.get_probe_test_accuracy(probes, chosen, acts, 7, perform_scr)
    monkeypatch.undo()
    assert traced == plain and torch.equal(torch.get_rng_state(), plain_after)
    assert (probe_training.test_probe_gpu, probe_training.prepare_probe_data) == (test, prepare)
    outcomes = evaluate_lib._outcomes_by_name(traced, tests)
    pools = tuple(sorted(sizes.items()))
    assert outcomes is not None and outcomes["pools"] == pools and list(outcomes["by_name"]) == list(traced) and len(read) == len(traced)
    assert len(traced) == (len(chosen) + 6 if perform_scr else len(chosen))  # SCR: each paired class's data under the other probes
    offsets = dict(zip([key for key, _ in pools], np.cumsum([0] + [n for _, n in pools]).tolist(), strict=False))
    rows = torch.cat([acts[key] for key, _ in pools])  # [all texts, d], pools in sorted order
    for (name, (texts, correct)), (inputs, labels, probe) in zip(outcomes["by_name"].items(), read, strict=True):
        assert torch.equal(rows[torch.as_tensor(texts)], inputs), name  # each traced text is the row the probe read
        data = name.split(" probe on ", 1)[1].removesuffix(" data") if " probe on " in name else name
        positives = set(texts[labels.numpy() == dataset_info.POSITIVE_CLASS_LABEL].tolist())
        assert positives == set(range(offsets[data], offsets[data] + sizes[data])), name
        with torch.no_grad():
            assert np.array_equal(correct, ((probe(inputs) > 0).long() == labels).numpy()), name
        assert float(np.mean(correct)) == pytest.approx(traced[name], abs=1e-7)


@pytest.mark.parametrize("probe", ["sklearn top-k", "gpu"])
def test_a_traced_sparse_probe_training_names_the_texts_each_probe_read_and_leaves_saebench_unchanged(probe):
    """`evaluate._traced_trainings` around SAEBench's own `train_probe_on_activations` as sparse probing calls it (a
    scikit-learn probe on the top-k dimensions, or the GPU probe tested after every epoch):
    each class's traced texts are exactly the test rows its probe read, its positives the class's whole test pool,
    its answers the probe's own (the GPU probe's at every epoch, the best of which is SAEBench's accuracy), and
    SAEBench's accuracies and the random state after the call are those of an untraced call."""
    import numpy as np
    from sae_bench.evals.sparse_probing import probe_training
    from sae_bench.sae_bench_utils import dataset_info

    sizes = {"0": 24, "1": 24, "2": 24}  # as SAEBench's balanced classes (its type checks keep the first class's sizes)
    generator = torch.Generator().manual_seed(2)
    means = {key: torch.randn(6, generator=generator) for key in sizes}
    train = {key: torch.randn(2 * n, 6, generator=generator) + means[key] for key, n in sizes.items()}  # [texts, d]
    test = {key: torch.randn(n, 6, generator=generator) + means[key] for key, n in sizes.items()}
    options = {"select_top_k": 2} if probe == "sklearn top-k" else {"use_sklearn": False, "batch_size": 16, "epochs": 4, "lr": 1e-2}
    torch.manual_seed(9)
    with contextlib.redirect_stdout(io.StringIO()):
        _, plain = probe_training.train_probe_on_activations(train, test, **options)
    plain_after = torch.get_rng_state()
    torch.manual_seed(9)
    classes: list[dict] = []
    originals = [
        getattr(probe_training, name) for name in ("prepare_probe_data", "train_sklearn_probe", "train_probe_gpu", "test_probe_gpu")
    ]
    with evaluate_lib._traced_trainings(classes), contextlib.redirect_stdout(io.StringIO()):
        probes, traced = probe_training.train_probe_on_activations(train, test, **options)
    assert traced == plain and torch.equal(torch.get_rng_state(), plain_after)
    assert [
        getattr(probe_training, n) for n in ("prepare_probe_data", "train_sklearn_probe", "train_probe_gpu", "test_probe_gpu")
    ] == originals
    outcomes = evaluate_lib._class_outcomes(traced, classes)
    pools = tuple(sorted(sizes.items()))
    assert outcomes is not None and outcomes["pools"] == pools and list(outcomes["by_class"]) == list(traced)
    offsets = dict(zip([key for key, _ in pools], np.cumsum([0] + [n for _, n in pools]).tolist(), strict=False))
    rows = torch.cat([test[key] for key, _ in pools])  # [all test texts, d], pools in sorted order
    for key, (texts, tests) in outcomes["by_class"].items():
        assert len(tests) == (4 if probe == "gpu" else 1)  # every epoch's test (no early stop within 4 epochs)
        own = np.isin(texts, range(offsets[key], offsets[key] + sizes[key]))
        assert len(texts) == 2 * sizes[key] and set(texts[own].tolist()) == set(range(offsets[key], offsets[key] + sizes[key]))
        labels = torch.as_tensor(np.where(own, dataset_info.POSITIVE_CLASS_LABEL, dataset_info.NEGATIVE_CLASS_LABEL))
        if probe == "gpu":
            with torch.no_grad():  # the returned probe is the best epoch's: its answers are one of the traced epochs'
                best = ((probes[key](rows[torch.as_tensor(texts)]) > 0).long() == labels).numpy()
            assert any(np.array_equal(best, correct) for correct in tests)
            assert max(float(np.mean(c)) for c in tests) == pytest.approx(traced[key], abs=1e-7)
        else:
            assert float(np.mean(tests[0])) == pytest.approx(traced[key], abs=1e-12)


def test_the_bootstrap_of_texts_pairs_clean_with_ablated_and_two_saes_on_the_same_texts():
    """SCR's and TPP's bootstrap where every probe test was traced: the texts are resampled within each class, and
    every accuracy is recomputed from the probes' answers on the resampled texts. Here each TPP test reads two whole
    pools, so a metric is linear in the draw counts and its bootstrap variance is known in closed form: the sum over
    pools of n x the population variance of each text's coefficient. It equals that for one SAE (clean and ablated on
    the same texts: the few flipped answers carry the error), and for the difference of two SAEs replicate by
    replicate (the same resamples: same sample_id); the parametric fallback, which draws each accuracy on its own, is
    wider. A run without traced answers, or whose answers do not give SAEBench's accuracy, falls back and says why."""
    import numpy as np

    classes, n, ks, key = ["0", "1", "2"], 60, (2, 20), "tiny_tpp_results"
    pools = tuple((c, n) for c in classes)
    texts = {c: np.concatenate([np.arange(n) + n * i, np.arange(n) + n * ((i + 1) % 3)]) for i, c in enumerate(classes)}
    rng = np.random.default_rng(3)
    clean_right = {c: rng.random(2 * n) < 0.8 for c in classes}

    def sae(flip: float, seed: int, like: dict | None = None) -> tuple[dict, dict]:
        """A run of TPP for an SAE whose ablation flips each answer with probability ``flip`` (twice that on the ablated
        class's own test), or ``like``'s answers with those flips on top; and its answers."""
        flips = np.random.default_rng(seed)
        before = like or {a: {k: clean_right for k in ks} for a in classes}
        answers = {
            a: {k: {u: before[a][k][u] ^ (flips.random(2 * n) < flip * (1 + (u == a))) for u in classes} for k in ks} for a in classes
        }
        raw = {a: {k: {u: float(np.mean(answers[a][k][u])) for u in classes} for k in ks} for a in classes}
        outcome = {"pools": pools, "by_name": {c: (texts[c], clean_right[c]) for c in classes}}
        traced = {(a, k): {"pools": pools, "by_name": {u: (texts[u], answers[a][k][u]) for u in classes}} for a in classes for k in ks}
        tests = {id(raw[a][k]): (raw[a][k], traced[(a, k)]) for a in classes for k in ks}  # the dicts SAEBench keeps, by identity
        clean = {c: float(np.mean(clean_right[c])) for c in classes}
        bios = {c: [f"bio {c}.{i}" for i in range(n)] for c in classes}  # every class's own texts (as TPP's are)
        outcomes = {"clean": outcome, "tests": tests, "texts": bios}
        return {"raw": raw, "clean": clean, "n_test": {c: 2 * n for c in classes}, "outcomes": outcomes}, answers

    def closed_form_se(coefficient_of) -> float:
        """The bootstrap SE of sum_i w_i a_i, w multinomial within each pool: sqrt(sum over pools of n x popvar(a))."""
        a = np.zeros(3 * n)
        for c in classes:
            np.add.at(a, texts[c], coefficient_of(c))
        return float(np.sqrt(sum(n * a[i * n : (i + 1) * n].var() for i in range(3))))

    metric = "tpp_threshold_2_intended_diff_only"  # the mean over classes of clean minus ablated on the class's own test
    first, first_answers = sae(0.06, 1)
    second, second_answers = sae(0.02, 2, like=first_answers)  # an SAE much like the first: most of its flips are the first's
    a, b = (evaluate_lib.scr_tpp_uncertainty("tpp", [key], [run], sae_identity=name) for run, name in ((first, "a"), (second, "b")))
    assert a["se_kind"] == b["se_kind"] == "bootstrap_se" and a["sample_id"] == b["sample_id"] and "untraced" not in a

    def own(answers):
        return lambda c: (clean_right[c].astype(float) - answers[c][2][c]) / (2 * n * len(classes))

    assert a["se"][metric] == pytest.approx(closed_form_se(own(first_answers)), rel=0.1)
    differences = np.array(a["samples"][metric]) - np.array(b["samples"][metric])
    paired = closed_form_se(lambda c: (second_answers[c][2][c].astype(float) - first_answers[c][2][c]) / (2 * n * len(classes)))
    assert float(differences.std(ddof=1)) == pytest.approx(paired, rel=0.1)
    assert paired < 0.7 * math.hypot(a["se"][metric], b["se"][metric])  # what the same resamples gain (0.6 of it here)
    assert evaluate_lib.scr_tpp_uncertainty("tpp", [key], [sae(0.06, 1)[0]], sae_identity="other")["samples"] == a["samples"]
    # the parametric fallback draws each accuracy alone: wider (1.9 times here)
    untraced = {k: v for k, v in first.items() if k != "outcomes"}
    fallback = evaluate_lib.scr_tpp_uncertainty("tpp", [key], [untraced], sae_identity="a")
    assert fallback["se_kind"] == "binomial_se" and fallback["untraced"].startswith("no traced probe tests")
    assert fallback["sample_id"] != a["sample_id"] and fallback["se"][metric] > 1.5 * a["se"][metric]
    wrong = {**first, "clean": {**first["clean"], "0": first["clean"]["0"] + 0.05}}  # answers not giving SAEBench's accuracy
    assert "do not give SAEBench's accuracy" in evaluate_lib.scr_tpp_uncertainty("tpp", [key], [wrong])["untraced"]
    unknown = {**first, "outcomes": {**first["outcomes"], "texts": None}}  # which texts were tested is not known
    assert "which texts" in evaluate_lib.scr_tpp_uncertainty("tpp", [key], [unknown])["untraced"]
    assert a["texts"] == [{"entries": 3 * n, "texts": 3 * n, "strata": 3}]


def test_sparse_probings_bootstrap_of_texts_is_the_closed_form_pairs_two_saes_and_repicks_the_best_epoch():
    """Sparse probing's bootstrap where every probe test was traced. Two classes of n texts; each class's probe reads
    every text (its own as positives, the other's as negatives), so a metric is linear in the draw counts and its
    bootstrap variance is known in closed form (the sum over classes of n x the population variance of each text's
    coefficient). Two SAEs on the same texts draw the same resamples (same sample_id), so their difference is paired
    text by text. A GPU probe's accuracy is its best epoch's, and each replicate picks again: its samples are the
    replicate-wise maximum of each epoch's. Answers that do not give SAEBench's accuracy, or no answers, fall back."""
    import numpy as np

    n, key, classes = 80, "tiny_sentiment_results", ("a", "b")
    pools = tuple((c, n) for c in classes)
    read = np.arange(2 * n)  # entries: class a's texts, then b's
    rng = np.random.default_rng(5)
    right = {m: {c: rng.random(2 * n) < p for c in classes} for m, p in (("one", 0.8), ("like_one", 0.8), ("epoch_2", 0.75))}
    right["like_one"] = {c: right["one"][c] ^ (rng.random(2 * n) < 0.05) for c in classes}  # another SAE, most answers alike
    right["epoch_2"]["b"] = right["one"]["b"]

    def accuracy_of(tests):
        return max(float(np.mean(c)) for c in tests)

    tests_of = {  # metric -> class -> the answers of each test (epoch)
        "sae_top_1_test_accuracy": {c: [right["one"][c]] for c in classes},
        "sae_top_2_test_accuracy": {c: [right["like_one"][c]] for c in classes},
        "sae_test_accuracy": {"a": [right["one"]["a"], right["epoch_2"]["a"]], "b": [right["one"]["b"]]},
        "llm_test_accuracy": {"a": [right["epoch_2"]["a"]], "b": [right["one"]["b"]]},
    }
    per_class = {key: {m: {c: accuracy_of(t) for c, t in by_class.items()} for m, by_class in tests_of.items()}}
    by_name = {m: {"pools": pools, "by_class": {c: (read, ts) for c, ts in by_class.items()}} for m, by_class in tests_of.items()}
    runs = {key: {"texts": {c: [f"review {c}.{i}" for i in range(n)] for c in classes}, "by_name": by_name}}
    traced, why = evaluate_lib._sparse_probing_traced(per_class, runs)
    assert why is None
    result = evaluate_lib.sparse_probing_bootstrap(per_class, traced, {}, replicates=4000)
    assert result["se_kind"] == "bootstrap_se" and result["texts"] == {key: {"entries": 2 * n, "texts": 2 * n, "strata": 2}}

    def closed_form_se(coefficient: np.ndarray) -> float:  # coefficient per text
        return float(np.sqrt(sum(n * coefficient[i * n : (i + 1) * n].var() for i in range(2))))

    def mean_over_classes(answers) -> np.ndarray:  # each text's share in the mean over classes of each class's accuracy
        return sum(answers[c].astype(float) for c in classes) / (2 * n * len(classes))

    assert result["se"]["sae_top_1_test_accuracy"] == pytest.approx(closed_form_se(mean_over_classes(right["one"])), rel=0.05)
    samples = {m: np.array(v) for m, v in result["samples"].items()}
    paired = closed_form_se(mean_over_classes(right["like_one"]) - mean_over_classes(right["one"]))
    difference = samples["sae_top_2_test_accuracy"] - samples["sae_top_1_test_accuracy"]
    assert float(difference.std(ddof=1)) == pytest.approx(paired, rel=0.05)
    assert paired < 0.5 * math.hypot(result["se"]["sae_top_1_test_accuracy"], result["se"]["sae_top_2_test_accuracy"])
    # the best epoch picked again in every replicate: class a's best of its two epochs, class b's one
    best = np.maximum(samples["sae_top_1_test_accuracy"], samples["llm_test_accuracy"])
    assert np.allclose(samples["sae_test_accuracy"], best, atol=1e-8)
    assert not np.allclose(best, samples["sae_top_1_test_accuracy"])  # the other epoch is the best in some resamples
    # another run on the same texts draws the same resamples; other texts, other ones
    again = evaluate_lib.sparse_probing_bootstrap(per_class, traced, {}, replicates=4000)
    assert again["sample_id"] == result["sample_id"] and again["samples"] == result["samples"]
    other_texts = {key: {**runs[key], "texts": {c: [f"other {c}.{i}" for i in range(n)] for c in classes}}}
    elsewhere = evaluate_lib.sparse_probing_bootstrap(per_class, evaluate_lib._sparse_probing_traced(per_class, other_texts)[0], {})
    assert elsewhere["sample_id"] != result["sample_id"]
    # what falls back, and why
    wrong = {key: {**per_class[key], "llm_test_accuracy": {"a": 0.5, "b": per_class[key]["llm_test_accuracy"]["b"]}}}
    assert "do not give SAEBench's accuracy" in evaluate_lib._sparse_probing_traced(wrong, runs)[1]
    untraced = {key: {**runs[key], "by_name": {**by_name, "sae_test_accuracy": None}}}
    assert "sae_test_accuracy was not traced" in evaluate_lib._sparse_probing_traced(per_class, untraced)[1]
    unknown = {key: {**runs[key], "texts": None}}
    assert "which texts" in evaluate_lib._sparse_probing_traced(per_class, unknown)[1]
    placeholder = {key: {**per_class[key], "sae_test_accuracy": {"-1": -1}}}  # SAEBench's lower-VRAM placeholder: no error
    assert (
        "sae_test_accuracy"
        not in evaluate_lib.sparse_probing_bootstrap(placeholder, evaluate_lib._sparse_probing_traced(placeholder, runs)[0], {})["se"]
    )


def test_datasets_that_test_on_the_same_texts_are_resampled_together():
    """SAEBench's two Amazon sparse-probing tasks are views of one repository: the same review is a test text of both.
    Drawn apart, one review's two tests would count as independent and the error of their mean would be too small
    (by up to 1/sqrt 2). Datasets sharing texts are resampled together: each text drawn once for all, every dataset's
    classes keeping their sizes (here crossed: category a/b against sentiment pos/neg); a dataset sharing nothing
    draws exactly what it drew alone before."""
    import numpy as np

    n = 80
    reviews = [f"review {i}" for i in range(n)]
    category = {"a": reviews[:40], "b": reviews[40:]}
    sentiment = {"pos": reviews[:20] + reviews[40:60], "neg": reviews[20:40] + reviews[60:]}
    bios = {"c": [f"bio {i}" for i in range(30)], "d": [f"bio {i}" for i in range(30, 60)]}
    rng = np.random.default_rng(11)

    def dataset(classes: dict, right_of: dict | None = None):
        pools = tuple((c, len(texts)) for c, texts in classes.items())
        read = np.arange(sum(len(texts) for texts in classes.values()))
        right = right_of or {c: rng.random(len(read)) < 0.8 for c in classes}
        by_name = {"sae_top_1_test_accuracy": {"pools": pools, "by_class": {c: (read, [right[c]]) for c in classes}}}
        accuracies = {"sae_top_1_test_accuracy": {c: float(np.mean(right[c])) for c in classes}}
        return {"texts": classes, "by_name": by_name}, accuracies, right

    # the same texts and answers twice: drawn together, the two datasets move as one, and so does their mean
    one, accuracies, right = dataset(category)
    two, _, _ = dataset(category, right)
    per_class = {"first_results": accuracies, "second_results": accuracies}
    traced, why = evaluate_lib._sparse_probing_traced(per_class, {"first_results": one, "second_results": two})
    assert why is None
    result = evaluate_lib.sparse_probing_bootstrap(per_class, traced, {}, replicates=2000)
    metric = "sae_top_1_test_accuracy"
    assert result["resampled_together"] == [["first_results", "second_results"]]
    assert result["per_dataset_se"]["first_results"] == result["per_dataset_se"]["second_results"]
    assert result["se"][metric] == pytest.approx(result["per_dataset_se"]["first_results"][metric], rel=1e-12)
    # the old draw (each dataset apart) gave the mean about 1/sqrt 2 of that
    apart = [evaluate_lib._resampled_text_counts(traced[d][0], 2000, [evaluate_lib.BOOTSTRAP_SEED, 5, i]) for i, d in enumerate(per_class)]
    tests = [(np.arange(2 * 40), right[c]) for c in category]
    apart_mean = np.mean([evaluate_lib._reweighted_accuracies(c, tests).mean(axis=1) for c in apart], axis=0)
    assert float(apart_mean.std(ddof=1)) < 0.8 * result["se"][metric]

    # crossed classes over partly shared texts (sentiment lacks ten reviews of each category and has ten of its own),
    # joined through a third dataset too (two of its texts are sentiment's own), and a dataset sharing nothing
    extra = [f"review {i}" for i in range(n, n + 20)]
    sentiment = {"pos": reviews[:15] + reviews[40:55] + extra[:10], "neg": reviews[20:35] + reviews[60:75] + extra[10:]}
    chain = {"x": extra[:2] + [f"other {i}" for i in range(18)], "y": [f"other {i}" for i in range(18, 38)]}
    runs = {"category": dataset(category)[0], "sentiment": dataset(sentiment)[0], "bios": dataset(bios)[0], "chain": dataset(chain)[0]}
    units = [evaluate_lib.TextUnits.of(run["by_name"][metric]["pools"], run["texts"]) for run in runs.values()]
    counts, joint = evaluate_lib.resampled_runs(units, 500, [7, 5])
    assert joint == [[0, 1, 3]]
    drawn = [{} for _ in units]  # per run: text -> its count per replicate
    for index, (run, entries) in enumerate(zip(runs.values(), counts, strict=True)):
        names = [text for texts in run["texts"].values() for text in texts]
        for column, text in enumerate(names):
            drawn[index][text] = entries[:, column]
        for label, texts in run["texts"].items():  # every class keeps its size in every replicate
            assert (sum(drawn[index][text] for text in texts) == len(texts)).all(), label
    shared = set(drawn[0]) & set(drawn[1])
    assert len(shared) == 60 and all((drawn[0][text] == drawn[1][text]).all() for text in shared)  # drawn once for both
    assert all((drawn[1][text] == drawn[3][text]).all() for text in extra[:2])
    assert any((drawn[0][text] != 1).any() for text in reviews)
    alone = evaluate_lib._resampled_text_counts(units[2], 500, [7, 5, 2])
    assert np.array_equal(counts[2], alone)  # as before this change


def test_a_text_that_is_an_entry_of_several_classes_is_resampled_once():
    """SCR's classes regroup the same bios ("male / female" and "female_data_only" are the four quadrants that
    "professor / nurse" and "nurse_data_only" hold again), so the bootstrap resamples distinct texts, not class
    entries: every entry of one text is drawn as often as the text, and every class keeps its number of entries in
    every resample (texts are resampled within the texts of the same classes). Drawing the classes apart would draw
    one bio differently in two of them."""
    import numpy as np

    quadrant = {q: [f"{q} bio {i}" for i in range(5)] for q in ("mp", "mn", "fp", "fn")}  # male/female x prof/nurse
    texts = {
        "male / female": quadrant["mp"] + quadrant["mn"],
        "female_data_only": quadrant["fp"] + quadrant["fn"],
        "professor / nurse": quadrant["mp"] + quadrant["fp"],
        "nurse_data_only": quadrant["mn"] + quadrant["fn"],
        "male_professor / female_nurse": quadrant["mp"] + [f"more mp bio {i}" for i in range(5)],
    }
    pools = tuple(sorted((key, len(rows)) for key, rows in texts.items()))
    units = evaluate_lib.TextUnits.of(pools, texts)
    assert units.summary() == {"entries": 50, "texts": 25, "strata": 5}  # mp; mn; fp; fn; the extra male professors
    counts = evaluate_lib._resampled_text_counts(units, 400, [0, 3, 0])  # [replicates, entries]
    entries = [digest for key, _ in pools for digest in texts[key]]
    for text in set(entries):
        where = [i for i, d in enumerate(entries) if d == text]
        assert all(np.array_equal(counts[:, where[0]], counts[:, i]) for i in where), text  # its entries move together
    start = 0
    for _, size in pools:
        assert (counts[:, start : start + size].sum(axis=1) == size).all()  # every class keeps its number of entries
        start += size
    assert counts.std(axis=0).min() > 0.5  # every text is resampled
    assert evaluate_lib.TextUnits.of(pools, {**texts, "nurse_data_only": texts["nurse_data_only"][:-1]}) is None
    other = {**texts, "male / female": [*texts["male / female"][:-1], "another bio"]}
    assert evaluate_lib.TextUnits.of(pools, other).digest != units.digest  # other texts: never the same resamples


def test_scrs_replicates_without_a_direction_are_none_at_the_same_places_for_every_sae_on_the_model():
    """SCR's ``scr_metric`` is missing in a replicate where its two directions' redrawn clean accuracies tie; the clean
    accuracies are drawn the same for every SAE on the model, so the same replicates lack it for each, None keeps
    replicate i at position i, and compare pairs the replicates both have."""
    import numpy as np

    probe = "male_professor / female_nurse"
    names = ["male / female", "professor / nurse", f"{probe} probe on professor / nurse data", f"{probe} probe on male / female data"]
    clean = {names[0]: 0.9, names[1]: 0.92, names[2]: 0.6, names[3]: 0.6}  # the two directions' clean accuracies tie often

    def run(ablated: float) -> dict:
        raw = {names[0]: {2: {names[2]: ablated}}, names[1]: {2: {names[3]: ablated - 0.05}}}
        return {"raw": raw, "clean": dict(clean), "n_test": {name: 10 for name in names}}

    a, b = (evaluate_lib.scr_tpp_uncertainty("scr", ["x_scr_results"], [run(p)], sae_identity=str(p), replicates=400) for p in (0.8, 0.7))
    lacking = [[i for i, v in enumerate(u["samples"]["scr_metric_threshold_2"]) if v is None] for u in (a, b)]
    assert lacking[0] and lacking[0] == lacking[1] and len(lacking[0]) < 400, lacking  # ties: about one replicate in ten
    assert a["replicates_with_metric"]["scr_metric_threshold_2"] == 400 - len(lacking[0])
    assert all(len(u["samples"][m]) == 400 and None not in u["samples"][m] for u in (a, b) for m in ("scr_dir1_threshold_2",))
    present = [v for v in a["samples"]["scr_metric_threshold_2"] if v is not None]
    assert a["se"]["scr_metric_threshold_2"] == pytest.approx(float(np.std(present, ddof=1)), rel=1e-6)  # samples: 9 decimals


def test_saebench_scr_tpp_ablation_reaches_padded_positions():
    """Pins the SAEBench behaviour the README documents ("Known SAEBench deviation"): its SCR/TPP ablation assumes
    zeroed (padded) positions add nothing, but at such a position it adds decode(ablated f(0)) - decode(f(0)), so
    ablating a latent that fires on a zero input (a TopK SAE always has k) moves every text's probe input with the
    amount of padding. Without ablation the padding adds nothing, as SAEBench intends. If SAEBench fixes this, the
    first assertion fails and the README's deviation and this test go."""
    from sae_bench.evals.scr_and_tpp.main import ablated_precomputed_activations

    sae = topk_sae("blocks.0.hook_resid_post", d_in=32, seed=4)
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(6, 20, 32, generator=generator)
    acts[:, 12:] = 0.0  # texts of 12 tokens, padded and zeroed as SAEBench zeroes padding
    padded = torch.cat([acts, torch.zeros(6, 44, 32)], dim=1)  # the same texts at a longer context: only more padding
    with torch.no_grad():
        on_zero = sae.encode(torch.zeros(1, 32))[0] != 0
        assert on_zero.sum() == 8  # k latents fire on a zero input
        ablate_zero_input_latents = on_zero.clone()
        nothing = torch.zeros_like(on_zero)
        short, long = (ablated_precomputed_activations(a, sae, ablate_zero_input_latents, 125) for a in (acts, padded))
        assert (short - long).abs().max() > 0.1 * short.abs().max()  # the padding moved the probe input
        short, long = (ablated_precomputed_activations(a, sae, nothing, 125) for a in (acts, padded))
        torch.testing.assert_close(short, long)  # with nothing ablated, padding adds nothing


def masked_ablation_reference(acts_BLD, sae, to_ablate, sae_batch_size):
    """SAEBench's `ablated_precomputed_activations` with its one deviation fixed, written independently: the modified
    activations are multiplied by the mask of real positions before the mean, as SAEBench's node effects and meaned
    SAE activations multiply theirs."""
    means = []
    for start in range(0, acts_BLD.shape[0], sae_batch_size):
        acts = acts_BLD[start : start + sae_batch_size]
        real = (acts.sum(dim=-1) != 0).to(acts.dtype)  # [B, L]
        latents = sae.encode(acts)
        error = acts - sae.decode(latents)
        latents[..., to_ablate] = 0.0
        modified = (sae.decode(latents) + error) * real[:, :, None]
        means.append(modified.sum(dim=1) / real.sum(dim=1)[:, None])
    return torch.cat(means)


@pytest.mark.parametrize("architecture,norm", [("topk", "none"), ("jumprelu", "none"), ("standard", "layer_norm")])
def test_the_padding_leak_removed_each_text_gets_its_unpadded_ablated_mean(architecture, norm):
    """SAEBench's ablated mean less ``padding_leak`` is the text's ablated mean without any padding, whatever the
    context adds; SAEBench's own value is not (where the SAE fires on a zero input). A layer-norm SAE decodes a zero
    input to zero (its scale is the input's), so it leaks nothing: exactly zero."""
    from sae_bench.evals.scr_and_tpp.main import ablated_precomputed_activations

    sae = random_sae(architecture, "blocks.0.hook_resid_post", norm, seed=5)
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 12, 20, 9, 16, 3]
    acts = torch.randn(len(lengths), 20, 32, generator=generator)
    for text, length in enumerate(lengths):
        acts[text, length:] = 0.0  # padding, zeroed as SAEBench zeroes it
    longer = torch.cat([acts, torch.zeros(len(lengths), 37, 32)], dim=1)  # the same texts at a longer context
    with torch.no_grad(), repeated_inputs_cached(sae):
        fires_on_zero = sae.encode(torch.zeros(1, 1, 32))[0, 0] != 0
        to_ablate = fires_on_zero.clone()
        to_ablate[:10] = True  # and some that need not
        alone = torch.cat([ablated_precomputed_activations(acts[t : t + 1, :n], sae, to_ablate, 4) for t, n in enumerate(lengths)])
        for padded in (acts, longer):
            saebench = ablated_precomputed_activations(padded, sae, to_ablate, 4)
            leak = evaluate_lib.padding_leak(padded, sae, to_ablate)
            # up to float32 rounding of SAEBench's sum, which carries the leak of every padded position (57 here)
            torch.testing.assert_close(saebench - leak, alone, atol=1e-4, rtol=1e-4)
            if norm == "layer_norm":
                assert not leak.any()
            else:
                assert fires_on_zero.any() and (saebench - alone).abs().max() > 1e-3  # SAEBench's value moved
            assert evaluate_lib.padding_leak(padded, sae, torch.zeros_like(to_ablate)).abs().max() == 0  # nothing ablated


@pytest.mark.parametrize("suite", ["scr", "tpp"])
def test_scr_and_tpp_log_saebenchs_numbers_and_beside_them_the_padding_masked_ones(
    experiment, pruned, offline_data, tmp_path, monkeypatch, suite
):
    """Beside SAEBench's numbers (bit for bit those of SAEBench's own run_eval_single_sae), every SCR/TPP metric has
    a ``_padding_masked`` twin: the number SAEBench gives with its ablation masked as the rest of SAEBench masks
    (an independent reference patched into SAEBench), per dataset and averaged. A TopK SAE fires on a zero input, so
    the ablations leak into the padding: the ablated means the twins' probes read differ from SAEBench's and equal the
    reference's. TPP's twins differ from SAEBench's numbers at these sizes; SCR's few test texts happen not to flip a
    probe decision here (in the tiny pipeline's cold run 197 of 252 SCR twins differ, benchmarks/README.md)."""
    import random

    import numpy as np
    from sae_bench.evals.scr_and_tpp import main as scr_tpp

    def probe_inputs_per_pass(patch) -> list[list[dict]]:
        """Spies on SAEBench: per pass of its ablation loop, the ablated means each of its probe tests reads."""
        passes, inside = [], []
        ablations, probe_tests = scr_tpp.perform_feature_ablations, scr_tpp.get_probe_test_accuracy

        def ablation_pass(*args, **kwargs):
            passes.append([])
            inside.append(True)
            try:
                return ablations(*args, **kwargs)
            finally:
                inside.pop()

        def probe_test(probes, classes, activations, *rest):
            if inside:
                passes[-1].append({k: v.clone() for k, v in activations.items()})
            return probe_tests(probes, classes, activations, *rest)

        patch.setattr(scr_tpp, "perform_feature_ablations", ablation_pass)
        patch.setattr(scr_tpp, "get_probe_test_accuracy", probe_test)
        return passes

    config = saebench_config(suite, experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    hook = "blocks.1.hook_resid_post"
    expected, inputs, leaks = {}, {}, []
    leak = evaluate_lib.padding_leak
    with offline_datasets(offline_data / "hf_datasets"):
        with monkeypatch.context() as patch:
            patch.setattr(evaluate_lib, "padding_leak", lambda *args: leaks.append(leak(*args)) or leaks[-1])  # all positional
            inputs["ours"] = probe_inputs_per_pass(patch)
            ours = run_suite(suite, pruned.tl, topk_sae(hook, seed=6), config, tmp_path / "ours", "sae")
        for kind in ("saebench", "masked"):
            random.seed(config.random_seed)
            np.random.seed(config.random_seed)
            torch.manual_seed(config.random_seed)
            sae = evaluate_lib.prepared_for_saebench(topk_sae(hook, seed=6), config.model_name)
            with monkeypatch.context() as patch, torch.enable_grad():
                inputs[kind] = probe_inputs_per_pass(patch)
                if kind == "masked":
                    patch.setattr(scr_tpp, "ablated_precomputed_activations", masked_ablation_reference)
                expected[kind], _ = scr_tpp.run_eval_single_sae(config, sae, pruned.tl, "cpu", str(tmp_path / kind), save_activations=False)
    # our run: per dataset SAEBench's pass, then the twins' pass; SAEBench's exactly, the twins' as the reference's
    assert len(inputs["ours"]) == 2 * len(inputs["saebench"]) == 2 * len(inputs["masked"]) > 0
    moved = 0.0
    passes = zip(inputs["ours"][0::2], inputs["ours"][1::2], inputs["saebench"], inputs["masked"], strict=True)
    for ours_pass, twin_pass, saebench_pass, reference_pass in passes:
        for ours_means, twin, saebench_means, reference in zip(ours_pass, twin_pass, saebench_pass, reference_pass, strict=True):
            for name in saebench_means:
                assert torch.equal(ours_means[name], saebench_means[name])
                torch.testing.assert_close(twin[name], reference[name], atol=1e-4, rtol=1e-4)
                moved = max(moved, float((twin[name] - saebench_means[name]).abs().max()))
    assert moved > 1e-2  # the twins' probes read other means than SAEBench's
    details = {d["dataset_name"]: d for d in ours.output["eval_result_details"]}
    averaged = {k: v for k, v in expected["saebench"].items() if not isinstance(v, dict)}
    assert {k: ours.output["eval_result_metrics"][f"{suite}_metrics"].get(k, v) for k, v in averaged.items()} == averaged
    per_dataset = {k: v for k, v in expected["saebench"].items() if isinstance(v, dict)}
    assert per_dataset and all({n: details[k][n] for n in v} == v for k, v in per_dataset.items())
    saebench_names = [m.removeprefix(f"{suite}.") for m in ours.metrics if not m.endswith((evaluate_lib.PADDING_MASKED, "_se"))]
    assert saebench_names and all(f"{suite}.{n}{evaluate_lib.PADDING_MASKED}" in ours.metrics for n in saebench_names)
    for name in saebench_names:
        assert ours.metrics[f"{suite}.{name}{evaluate_lib.PADDING_MASKED}"] == pytest.approx(expected["masked"][name], abs=1e-6), name
    masked_datasets = {k: v for k, v in expected["masked"].items() if isinstance(v, dict)}
    assert set(ours.corrected["datasets"]) == set(masked_datasets)
    for key, numbers in masked_datasets.items():
        assert ours.corrected["datasets"][key] == pytest.approx(numbers, abs=1e-6), key
    assert any(x.abs().max() > 0.1 for x in leaks) and any(not x.any() for x in leaks)  # some ablations leak, some not
    if suite == "tpp":
        assert any(ours.metrics[f"{suite}.{n}"] != ours.metrics[f"{suite}.{n}{evaluate_lib.PADDING_MASKED}"] for n in saebench_names)
    check_scr_tpp_standard_errors(suite, ours, config, offline_data)


def check_scr_tpp_standard_errors(suite, result, config, offline_data, draws: int = 2000) -> None:
    """SCR's/TPP's metrics (SAEBench's and their twins) carry a standard error over the texts their probes were tested
    on: the test counts are those of SAEBench's own data split, every probe test was traced text by text (a bootstrap
    of the texts, not the parametric fallback), and since a clean and an ablated accuracy are read on the same texts,
    TPP's differences of them have a smaller error than an independent simulation gives, which redraws each accuracy
    as a binomial proportion on its own and applies SAEBench's own scoring and averaging (what the fallback does)."""
    import numpy as np
    from sae_bench.evals.scr_and_tpp import dataset_creation
    from sae_bench.evals.scr_and_tpp.main import COLUMN2_VALS_LOOKUP, create_tpp_plotting_dict, get_scr_plotting_dict
    from sae_bench.sae_bench_utils import dataset_info, dataset_utils
    from sae_bench.sae_bench_utils.general_utils import average_results_dictionaries

    uncertainty = result.uncertainty
    runs = []  # (SAEBench's per-dataset key, column1 values) in its order
    for name in config.dataset_names:
        if suite == "scr":
            runs += [(f"{name}_scr_{a}_{b}_results", name, (a, b)) for a, b in config.column1_vals_lookup[name]]
        else:
            runs.append((f"{name}_tpp_results", name, None))
    assert list(uncertainty["n_test"]) == [key for key, _, _ in runs]
    with offline_datasets(offline_data / "hf_datasets"):
        for key, name, column1 in runs:
            _, test = dataset_creation.get_train_test_data(
                name, suite == "scr", config.train_set_size, config.test_set_size, config.random_seed, column1, COLUMN2_VALS_LOOKUP[name]
            )
            if suite == "tpp":
                test = dataset_utils.filter_dataset(test, dataset_info.chosen_classes_per_dataset[name])
            counted = uncertainty["n_test"][key]
            assert counted and all(n == 2 * len(test[a.split(" probe on ")[-1].removesuffix(" data")]) for a, n in counted.items())
    names = [m.removeprefix(f"{suite}.") for m in result.metrics if not m.endswith("_se")]
    assert names and all(f"{suite}.{n}.bootstrap_se" in result.metrics for n in names)  # twins included
    assert any(result.metrics[f"{suite}.{n}.bootstrap_se"] > 0 for n in names)

    def scored(accuracies) -> dict[str, float]:
        with contextlib.redirect_stdout(io.StringIO()):
            per_run = {
                key: get_scr_plotting_dict(a["raw"], a["clean"]) if suite == "scr" else create_tpp_plotting_dict(a["raw"], a["clean"])[0]
                for key, a in accuracies.items()
            }
        return average_results_dictionaries(per_run, [key.removesuffix("_results") for key in per_run])

    rng = np.random.default_rng(12345)  # not the bootstrap's seed: an independent simulation
    observed = scored(uncertainty["accuracies"])
    drawn = {}  # per run, per accuracy (clean name, or ablated class, k, measured name): its redrawn values [draws]
    for key, a in uncertainty["accuracies"].items():
        n = uncertainty["n_test"][key]
        places = [(c,) for c in a["clean"]] + [(ab, k, c) for ab, by_k in a["raw"].items() for k, acc in by_k.items() for c in acc]
        p = [a["clean"][c[0]] if len(c) == 1 else a["raw"][c[0]][c[1]][c[2]] for c in places]
        counts = np.array([n[c[-1]] for c in places])
        drawn[key] = dict(zip(places, (rng.binomial(counts, p, size=(draws, len(places))) / counts).T.tolist(), strict=True))
    samples = {name: [] for name in observed}
    for i in range(draws):
        redrawn = {}
        for key, a in uncertainty["accuracies"].items():
            clean = {c: drawn[key][(c,)][i] for c in a["clean"]}
            raw = {ab: {k: {c: drawn[key][(ab, k, c)][i] for c in acc} for k, acc in by_k.items()} for ab, by_k in a["raw"].items()}
            redrawn[key] = {"raw": raw, "clean": clean}
        for name, value in scored(redrawn).items():
            samples.setdefault(name, []).append(value)
    assert uncertainty["se_kind"] == "bootstrap_se" and "untraced" not in uncertainty, uncertainty.get("untraced")
    assert uncertainty["method"].startswith("bootstrap of the test texts")
    # SCR's classes regroup the same bios: fewer distinct texts than entries (SAEBench's own split, read by content)
    for summary in uncertainty["texts"]:
        assert (summary["texts"] < summary["entries"]) if suite == "scr" else (summary["texts"] == summary["entries"]), summary
    ratios = []
    for name, value in observed.items():
        assert value == pytest.approx(result.metrics[f"{suite}.{name}"], abs=1e-12)  # the accuracies kept are SAEBench's
        se, independent = result.metrics[f"{suite}.{name}.bootstrap_se"], float(np.std(samples[name], ddof=1))
        assert math.isfinite(se) and se >= 0, name
        if suite == "tpp":  # linear in the accuracies: pairing clean with ablated on the same texts can only help
            assert se < independent, (name, se, independent)
            ratios.append(se / independent)
    assert suite != "tpp" or 0.3 < float(np.median(ratios)) < 0.9, ratios  # 0.63-0.72 here


@pytest.mark.parametrize("suite", ["scr", "tpp"])
def test_gemma2s_bos_and_a_jumprelu_hook_z_sae_share_the_model_side_exactly_and_get_their_twins(
    experiment, small_world, offline_data, tmp_path, suite
):
    """What Gemma Scope's experiment file meets: a BOS-first model (SAEBench zeroes BOS as it zeroes padding), a
    JumpReLU SAE at attn.hook_z (probed through the flat view). The SAE loading the shared model side scores exactly as
    a fresh run of it, its padding-masked twins included, and every number is finite."""
    loaded = load_model("tiny-gemma2", small_world / "tiny-gemma2")
    loaded.tl.cfg.model_name = "tiny-gemma2-test"
    config = saebench_config(suite, experiment.evaluation, "tiny-gemma2-test", "float32", loaded.tl, tiny=True)
    hook, shared = "blocks.1.attn.hook_z", tmp_path / "shared"
    with offline_datasets(offline_data / "hf_datasets"):
        first = run_suite(suite, loaded.tl, random_sae("jumprelu", hook, seed=1), config, tmp_path / "a", "first", shared=shared)
        reused = run_suite(suite, loaded.tl, random_sae("jumprelu", hook, seed=2), config, tmp_path / "b", "second", shared=shared)
        fresh = run_suite(suite, loaded.tl, random_sae("jumprelu", hook, seed=2), config, tmp_path / "c", "second")
    assert reused.tags[f"saecomp.{suite}.model_side"].startswith("loaded from")
    for part in ("eval_result_metrics", "eval_result_details", "eval_result_unstructured"):
        assert reused.output[part] == fresh.output[part], part
    assert reused.metrics == fresh.metrics and all(math.isfinite(v) for v in reused.metrics.values())
    twins = [m for m in reused.metrics if m.endswith(evaluate_lib.PADDING_MASKED)]
    values = [m for m in reused.metrics if not m.endswith("_se")]
    assert twins and len(twins) * 2 == len(values) and all(f"{m}.bootstrap_se" in reused.metrics for m in values)
    # the two SAEs resampled the same texts (compare pairs them replicate by replicate), with their own answers
    assert first.uncertainty["sample_id"] == reused.uncertainty["sample_id"] == fresh.uncertainty["sample_id"]
    assert first.uncertainty["samples"] != reused.uncertainty["samples"] == fresh.uncertainty["samples"]


@pytest.mark.parametrize(
    "model,architecture,hook,norm",
    [("tiny-gemma2", "jumprelu", "blocks.1.attn.hook_z", "none"), ("tiny-gpt2", "standard", "blocks.1.hook_resid_post", "layer_norm")],
)
def test_sparse_probing_of_gemma2s_bos_and_of_a_layer_norm_sae_is_traced_and_shares_the_model_side_exactly(
    experiment, small_world, offline_data, tmp_path, model, architecture, hook, norm
):
    """What the real experiment files bring to sparse probing: Gemma-2's BOS-first texts with a JumpReLU SAE at
    attn.hook_z (Gemma Scope's, probed through the flat view), and GPT-2's pretrained layer-norm SAEs. Every accuracy
    gets its error from the traced bootstrap (not the closed-form fallback), and a second SAE reading the shared model
    side scores exactly as a fresh run of it, over the same resampled texts."""
    loaded = load_model(model, small_world / model)
    loaded.tl.cfg.model_name = f"{model}-probing-test"
    config = saebench_config("sparse_probing", experiment.evaluation, loaded.tl.cfg.model_name, "float32", loaded.tl, tiny=True)
    shared = tmp_path / "shared"
    probe = lambda seed, folder, **shared: run_suite(  # noqa: E731
        "sparse_probing", loaded.tl, random_sae(architecture, hook, norm, seed=seed), config, tmp_path / folder, str(seed), **shared
    )
    with offline_datasets(offline_data / "hf_datasets"):
        first, reused, fresh = probe(1, "a", shared=shared), probe(2, "b", shared=shared), probe(2, "c")
    assert reused.tags["saecomp.sparse_probing.model_side"].startswith("loaded from")
    for part in ("eval_result_metrics", "eval_result_details", "eval_result_unstructured"):
        assert reused.output[part] == fresh.output[part], part
    assert reused.metrics == fresh.metrics and all(math.isfinite(v) for v in reused.metrics.values())
    for result in (first, reused):
        check_sparse_probing_standard_errors(result, config, offline_data)
    assert first.uncertainty["sample_id"] == reused.uncertainty["sample_id"] == fresh.uncertainty["sample_id"]
    assert first.uncertainty["samples"] != reused.uncertainty["samples"] == fresh.uncertainty["samples"]


def test_an_error_in_the_twins_leaves_saebenchs_numbers_and_says_why(experiment, pruned, offline_data, tmp_path, monkeypatch):
    """The twins are ours: if computing them fails, SAEBench's numbers and the random state after the suite are those
    of a run whose twins succeeded, the run says why it has no twins, and SAEBench's functions are its own again."""
    from sae_bench.evals.scr_and_tpp import main as scr_tpp

    functions = (scr_tpp.perform_feature_ablations, scr_tpp.run_eval_single_dataset, scr_tpp.ablated_precomputed_activations)
    config = saebench_config("tpp", experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    hook = "blocks.1.hook_resid_post"

    def broken(*args):
        raise RuntimeError("leak exploded")

    with offline_datasets(offline_data / "hf_datasets"):
        fine = run_suite("tpp", pruned.tl, topk_sae(hook, seed=7), config, tmp_path / "fine", "sae")
        state_after_fine = torch.get_rng_state()
        monkeypatch.setattr(evaluate_lib, "padding_leak", broken)
        with pytest.warns(UserWarning, match="padding-masked twins could not be computed"):
            failed = run_suite("tpp", pruned.tl, topk_sae(hook, seed=7), config, tmp_path / "failed", "sae")
        assert torch.equal(torch.get_rng_state(), state_after_fine)
    for part in ("eval_result_metrics", "eval_result_details", "eval_result_unstructured"):
        assert failed.output[part] == fine.output[part], part
    # SAEBench's numbers and their standard errors as with the twins (the twins' errors draw from their own generator)
    twins = (evaluate_lib.PADDING_MASKED, f"{evaluate_lib.PADDING_MASKED}.bootstrap_se")
    assert failed.metrics == {k: v for k, v in fine.metrics.items() if not k.endswith(twins)} != fine.metrics
    assert failed.corrected is None and failed.tags["saecomp.tpp.padding_masked_failed"] == "RuntimeError: leak exploded"
    assert (scr_tpp.perform_feature_ablations, scr_tpp.run_eval_single_dataset, scr_tpp.ablated_precomputed_activations) == functions
    # the standard errors are ours too: if computing them fails, every number stands without them and the run says why
    monkeypatch.undo()
    monkeypatch.setattr(evaluate_lib, "scr_tpp_uncertainty", lambda *args, **kwargs: broken())
    with offline_datasets(offline_data / "hf_datasets"), pytest.warns(UserWarning, match="tpp: no standard errors"):
        no_errors = run_suite("tpp", pruned.tl, topk_sae(hook, seed=7), config, tmp_path / "no_errors", "sae")
    assert no_errors.metrics == {k: v for k, v in fine.metrics.items() if not k.endswith(".bootstrap_se")} != fine.metrics
    assert no_errors.uncertainty is None and no_errors.tags["saecomp.tpp.se_failed"] == "RuntimeError: leak exploded"
    assert scr_tpp.get_probe_test_accuracy.__module__ == scr_tpp.__name__  # SAEBench's own again


def test_the_sae_memo_returns_what_the_sae_computes_and_never_a_stale_or_shared_tensor():
    """`RepeatedInputCache`: an input seen again gets the latents the SAE computes for it, as a copy its caller may
    zero in place; a reconstruction of untouched latents is the SAE's, of ablated ones recomputed; an input written
    in place, a different tensor, autograd or a spent budget all compute afresh; the SAE's methods come back after."""
    sae = topk_sae("blocks.1.hook_resid_post")
    acts = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = sae.encode(acts[2:4])
        expected_hat = sae.decode(expected)
        with repeated_inputs_cached(sae) as cache:
            for _ in range(4):  # as SAEBench's ablation loop: the same slice of the same tensor, again and again
                latents = sae.encode(acts[2:4])
                assert torch.equal(latents, expected)
                assert torch.equal(sae.decode(latents), expected_hat)
                latents[..., :5] = 0.0  # SAEBench's zero ablation, in place
                assert torch.equal(sae.decode(latents), sae.__class__.decode(sae, latents))
            assert cache.hits >= 2 and cache.entries
            assert torch.equal(sae.encode(acts[2:4]), expected)  # the in-place ablations never reached the memo
            other = acts.clone()
            assert torch.equal(sae.encode(other[2:4]), expected)  # same values, another tensor: computed
            acts[2:4] += 1.0  # written in place: its version changes, so its latents are computed again
            assert torch.equal(sae.encode(acts[2:4]), sae.__class__.encode(sae, acts[2:4]))
            assert not torch.equal(sae.encode(acts[2:4]), expected)
        with torch.enable_grad(), repeated_inputs_cached(sae) as cache:
            for _ in range(3):
                sae.encode(acts)
            assert cache.hits == 0 and not cache.entries
        with repeated_inputs_cached(sae, budget_bytes=0) as cache:
            for _ in range(3):
                sae.encode(acts)
            assert cache.hits == 0 and not cache.entries
    assert "encode" not in vars(sae) and "decode" not in vars(sae)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_saebench_ablation_decodes_stateful_normalisation_saes_with_their_inputs_statistics(norm, budget):
    """GPT-2's pretrained SAEs normalise their input with layer_norm: SAELens keeps the statistics at encode and drops
    them at decode, and SAEBench's ablation decodes twice per encode, so on its own it raises AttributeError. Through
    the memo (cached or not), each decode gets the statistics of the input its latents came from: exactly what
    encoding that input afresh before each decode gives."""
    from sae_bench.evals.scr_and_tpp.main import ablated_precomputed_activations

    sae = SAE.from_dict({"architecture": "topk", "d_in": 32, "d_sae": 128, "k": 8, "normalize_activations": norm,
                         "metadata": {"hook_name": "blocks.1.hook_resid_post"}})  # fmt: skip
    acts = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(5)) * 3 + 1
    ablate = torch.zeros(128, dtype=torch.bool)
    ablate[:20] = True
    with torch.no_grad():
        with pytest.raises(AttributeError):
            ablated_precomputed_activations(acts, sae, ablate, 2)  # SAEBench alone
        expected = []
        for i in range(0, 6, 2):
            batch = acts[i : i + 2]
            x_hat = sae.decode(sae.encode(batch))
            latents = sae.encode(batch)
            latents[..., ablate] = 0.0
            expected.append((sae.decode(latents) + (batch - x_hat)).sum(1) / 5)
        with repeated_inputs_cached(sae, budget_bytes=budget):
            for _ in range(3):  # as for every ablated class and n
                assert torch.equal(ablated_precomputed_activations(acts, sae, ablate, 2), torch.cat(expected))


def random_sae(architecture: str, hook_name: str, norm: str = "none", seed: int = 0, **cfg) -> SAE:
    """A random SAE of SAELens's ``architecture`` (TopK, standard or JumpReLU) with ``norm`` input normalisation."""
    extra = {"k": 8} if architecture == "topk" else {}
    sae = SAE.from_dict({"architecture": architecture, "d_in": 32, "d_sae": 128, "normalize_activations": norm,
                         "metadata": {"hook_name": hook_name}, **extra, **cfg})  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            if name == "threshold":
                p.abs_()  # JumpReLU's thresholds are positive
    return sae


# The architectures and normalisations the real experiment files meet: TopK (the tiny world's, Table 1's trained SAEs),
# standard with layer_norm (GPT-2's pretrained resid_post and mlp_out SAEs), JumpReLU (Gemma Scope).
@pytest.mark.parametrize(
    "suite,architecture,norm",
    [("scr", "topk", "none"), ("tpp", "topk", "none"), ("scr", "standard", "layer_norm"), ("tpp", "jumprelu", "none")],
)
def test_scr_and_tpp_with_the_sae_memo_score_exactly_as_without_it(
    experiment, pruned, offline_data, tmp_path, monkeypatch, suite, architecture, norm
):
    config = saebench_config(suite, experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    caches = []
    original = evaluate_lib.repeated_inputs_cached

    @contextlib.contextmanager
    def spied(sae, budget_bytes=None):
        with original(sae, budget_bytes) as cache:
            caches.append(cache)
            yield cache

    hook = "blocks.1.hook_resid_post"
    with offline_datasets(offline_data / "hf_datasets"):
        monkeypatch.setattr(evaluate_lib, "repeated_inputs_cached", spied)
        memoised = run_suite(suite, pruned.tl, random_sae(architecture, hook, norm, seed=4), config, tmp_path / "memo", "memo")
        monkeypatch.setattr(evaluate_lib, "REPEATED_INPUT_CACHE_BYTES", 0)
        plain = run_suite(suite, pruned.tl, random_sae(architecture, hook, norm, seed=4), config, tmp_path / "plain", "plain")
    assert caches[0].hits > 0 and caches[1].hits == 0  # the memo served the first run and none of the second
    for part in ("eval_result_metrics", "eval_result_details", "eval_result_unstructured"):
        assert memoised.output[part] == plain.output[part], part


def test_attention_saes_are_probed_through_a_flat_view_that_leaves_the_model_unchanged(experiment, pruned, offline_data, tmp_path):
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pruned.tl(tokens)
    sae = topk_sae("blocks.1.attn.hook_z")
    hooks_before = set(pruned.tl.hook_dict)
    hook_z = pruned.tl.hook_dict["blocks.1.attn.hook_z"]
    hook_z.add_perma_hook(lambda z, hook: None)  # someone else's hook: it must survive the adapter
    with flat_hook_z(pruned.tl, sae) as flat:
        assert flat.cfg.metadata.hook_name == "blocks.1.attn.hook_z_flat"
        with torch.no_grad():
            assert torch.equal(pruned.tl(tokens), before)
            _, cache = pruned.tl.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_z", "blocks.1.attn.hook_z_flat"])
        z = cache["blocks.1.attn.hook_z"]  # [batch, pos, n_heads, d_head]
        assert torch.equal(cache["blocks.1.attn.hook_z_flat"], z.reshape(*z.shape[:2], -1))
        assert torch.equal(flat.W_enc, sae.W_enc)
    assert set(pruned.tl.hook_dict) == hooks_before
    assert len(hook_z.fwd_hooks) == 1  # ours is gone, theirs is there
    with torch.no_grad():
        assert torch.equal(pruned.tl(tokens), before)
    hook_z.remove_hooks("fwd", including_permanent=True)
    config = saebench_config("sparse_probing", experiment.evaluation, "tiny-gpt2-pruned-test", "float32", pruned.tl, tiny=True)
    with offline_datasets(offline_data / "hf_datasets"):
        result = run_suite("sparse_probing", pruned.tl, sae, config, tmp_path, "random-z")
    assert all(math.isfinite(v) for v in result.metrics.values())


@pytest.mark.parametrize(
    "architecture,norm,finite",
    [("topk", "none", True), ("jumprelu", "none", True), ("standard", "layer_norm", True),
     ("standard", "expected_average_only_in", True), ("topk", "constant_norm_rescale", False),
     ("standard", "constant_norm_rescale", False)],
)  # fmt: skip
def test_saebench_reads_nan_from_padding_exactly_where_the_zero_input_check_refuses(architecture, norm, finite):
    """SAEBench zeroes padded positions, encodes them and masks the latents by multiplying with 0. A
    constant_norm_rescale SAE encodes a zero input to NaN (it divides by the input's norm) and NaN × 0 is NaN: SAEBench's
    meaned SAE activations (sparse probing's and the node effects' way) and SCR's and TPP's ablated means are NaN for
    every padded text. ``not_finite_at_zero_input`` refuses exactly those SAEs; the others give finite means."""
    from sae_bench.evals.scr_and_tpp.main import ablated_precomputed_activations
    from sae_bench.sae_bench_utils.activation_collection import get_sae_meaned_activations

    sae = random_sae(architecture, "blocks.1.hook_resid_post", norm, seed=3)
    acts = torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(2)) + 0.5
    acts[:2, 6:] = 0.0  # two padded texts, zeroed as SAEBench zeroes them
    ablate = torch.zeros(128, dtype=torch.bool)
    ablate[:30] = True
    with torch.no_grad(), repeated_inputs_cached(sae):  # the memo lets SAEBench decode stateful normalisations twice
        meaned = get_sae_meaned_activations({"class": acts}, sae, 2)["class"]  # [4, d_sae]
        ablated = ablated_precomputed_activations(acts, sae, ablate, 2)  # [4, d_in]
    reason = evaluate_lib.not_finite_at_zero_input(sae)
    assert (reason is None) == finite
    for means in (meaned, ablated):
        assert bool(torch.isfinite(means[2:]).all())  # unpadded texts are fine either way
        assert bool(torch.isfinite(means[:2]).all()) == finite
    if not finite:
        assert "constant_norm_rescale" in reason


@pytest.mark.parametrize("norm,finite", [("constant_norm_rescale", False), ("layer_norm", True), ("none", True)])
def test_the_zero_input_check_holds_in_bfloat16_through_the_flat_hook_z_view(pruned, norm, finite):
    """What run_suite checks for an attention SAE (reshaping hook_z, as the real files' are) in a bfloat16 model: the
    SAE cast to bfloat16 and read through the flat hook_z view. SAEBench's own functions on that view, in bfloat16,
    read NaN from padded texts exactly where the check refuses."""
    from sae_bench.evals.scr_and_tpp.main import ablated_precomputed_activations
    from sae_bench.sae_bench_utils.activation_collection import get_sae_meaned_activations

    sae = random_sae("jumprelu", "blocks.1.attn.hook_z", norm, seed=5, reshape_activations="hook_z").to(dtype=torch.bfloat16)
    acts = (torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(2)) + 0.5).to(torch.bfloat16)  # [text, pos, heads x d_head]
    acts[:2, 6:] = 0.0  # two padded texts, zeroed as SAEBench zeroes them
    ablate = torch.zeros(128, dtype=torch.bool)
    ablate[:30] = True
    with torch.no_grad(), flat_hook_z(pruned.tl, sae) as flat, repeated_inputs_cached(flat):
        assert flat is not sae and flat.dtype == torch.bfloat16 and flat.cfg.reshape_activations == "none"
        reason = evaluate_lib.not_finite_at_zero_input(flat)
        meaned = get_sae_meaned_activations({"class": acts}, flat, 2)["class"]  # [4, d_sae]
        ablated = ablated_precomputed_activations(acts, flat, ablate, 2)  # [4, d_in]
    assert (reason is None) == finite
    for means in (meaned, ablated):
        assert means.dtype == torch.bfloat16
        assert bool(torch.isfinite(means[2:]).all())
        assert bool(torch.isfinite(means[:2]).all()) == finite


@pytest.mark.parametrize(
    "suite,hook,dtype",
    [("sparse_probing", "blocks.1.hook_resid_post", "float32"), ("scr", "blocks.1.hook_resid_post", "float32"),
     ("tpp", "blocks.1.hook_resid_post", "float32"), ("tpp", "blocks.1.attn.hook_z", "bfloat16")],
)  # fmt: skip
def test_saebenchs_padded_suites_are_not_applicable_to_an_sae_that_is_nan_at_zero(experiment, pruned, tmp_path, suite, hook, dtype):
    """Such an SAE gets no SCR, TPP or sparse-probing number (a tag with the reason; the run goes on), before any
    compute: no folder of SAEBench's results is written. Also for an attention SAE in a bfloat16 evaluation."""
    config = saebench_config(suite, experiment.evaluation, "m", dtype, pruned.tl, tiny=True)
    extra = {"reshape_activations": "hook_z"} if hook.endswith("hook_z") else {}
    sae = random_sae("topk", hook, "constant_norm_rescale", seed=4, **extra)
    with pytest.raises(NotApplicable, match=rf"SAEBench's {suite} zeroes the activations at padded positions .*constant_norm_rescale"):
        run_suite(suite, pruned.tl, sae, config, tmp_path / "work", "nan-at-zero")
    assert not any(p.is_file() for p in (tmp_path / "work").rglob("*"))


@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"])
def test_absorption_is_not_applicable_to_saes_off_the_residual_stream(experiment, pruned, tmp_path, hook):
    """SAEBench's absorption feeds the SAE hook_resid_post whatever its hook: for any other SAE it would be wrong."""
    config = saebench_config("absorption", experiment.evaluation, "m", "float32", pruned.tl, tiny=True)
    with pytest.raises(NotApplicable, match="reads the residual stream"):
        run_suite("absorption", pruned.tl, topk_sae(hook), config, tmp_path, "random")


def test_absorption_on_a_model_that_knows_first_letters(experiment, small_world, tmp_path):
    """A one-layer model over the small world's tokenizer, with each word token's first letter planted in its
    embedding and a context long enough for SAEBench's prompts: SAEBench's probes find the letters, and absorption
    gives finite numbers in SAEBench's validated JSON. (The tiny models never saw spelling, and their 128-token
    context is shorter than SAEBench's prompts.)"""
    from sae_bench.evals.absorption.common import PROBES_DIR, RESULTS_DIR
    from sae_bench.evals.absorption.vocab import LETTERS, convert_tokens_to_string
    from tokenizers import AddedToken
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_world / "tokenizer")
    # SAEBench's absorption needs every answer " A" ... " Z" to be one token (all its prompts one length), as in
    # GPT-2's and Gemma's tokenizers; the small world's BPE splits a few.
    missing = [letter for letter in LETTERS.upper() if len(tokenizer(" " + letter)["input_ids"]) > 1]
    tokenizer.add_tokens([AddedToken(" " + letter, single_word=True, normalized=False) for letter in missing])
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # TransformerLens reloads it by path (to add BOS)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=512, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN"
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.cfg.model_name = "letters-test"
    directions = torch.linalg.qr(torch.randn(cfg.d_model, 26, generator=torch.Generator().manual_seed(0)))[0].T  # [26, d]
    scale = 8 * float(model.W_E.norm(dim=-1).mean())
    with torch.no_grad():
        for token, index in tokenizer.vocab.items():
            word = convert_tokens_to_string(token, tokenizer).strip().lower()
            if word and word[0] in LETTERS:
                model.W_E[index] += scale * directions[LETTERS.index(word[0])]
    padding_side = model.tokenizer.padding_side
    started = time.time()
    config = saebench_config("absorption", experiment.evaluation, "letters-test", "float32", model, tiny=True)
    result = run_suite("absorption", model, topk_sae("blocks.0.hook_resid_post"), config, tmp_path, "random")
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert 0 <= result.metrics["absorption.mean_absorption_fraction_score"] <= 1
    assert result.metrics["absorption.n_letters_evaluated"] >= experiment.evaluation.absorption_min_letters
    assert model.tokenizer.padding_side == padding_side  # left padding only for the duration
    # every probe and result went to our folder, nothing into SAEBench's own (inside site-packages)
    assert list((tmp_path / "absorption" / "probes").rglob("probe.pth"))
    assert not [p for d in (RESULTS_DIR, PROBES_DIR) if d.exists() for p in d.rglob("*") if p.stat().st_mtime >= started]
    check_absorption_standard_errors(result, tmp_path)
    # Where CUDA exists SAEBench's absorption works in bfloat16 (its DEFAULT_DTYPE, chosen at import): the letter gate's
    # ground-truth probe then scores in bfloat16 too, probe and activations alike, with about the same F1 per letter
    from sae_bench.evals.absorption import common

    probes = tmp_path / "absorption" / "probes"
    in_float32 = evaluate_lib.ground_truth_probe_f1(model, 0, config, probes, "cpu")
    with pytest.MonkeyPatch.context() as patch:  # SAEBench's functions as they are on a CUDA machine: bound defaults too
        patch.setattr(common, "DEFAULT_DTYPE", torch.bfloat16)
        loaders = (common.load_or_train_probe, common.load_probe, common.load_probe_data_split_or_train, common.load_probe_data_split)
        for function in map(inspect.unwrap, loaders):  # (beneath SAEBench's decorators)
            cuda_defaults = tuple(torch.bfloat16 if value is torch.float32 else value for value in function.__defaults__)
            patch.setattr(function, "__defaults__", cuda_defaults)
        in_bfloat16 = evaluate_lib.ground_truth_probe_f1(model, 0, config, probes, "cpu")
    assert set(in_bfloat16) == set(in_float32) and max(abs(in_bfloat16[k] - in_float32[k]) for k in in_float32) < 0.1


def check_absorption_standard_errors(result, workdir: Path, replicates: int = 2000) -> None:
    """Absorption's two means over words carry their standard error over the words tested: it agrees with a bootstrap
    over the words of SAEBench's own raw results file (resampled within each letter evaluated)."""
    import numpy as np
    import pandas as pd

    (raw_file,) = (workdir / "absorption" / "feature_absorption").rglob("layer_0_*.parquet")  # SAEBench's per-word results
    raw = pd.read_parquet(raw_file)
    details = {d["first_letter"]: d for d in result.output["eval_result_details"]}
    assert result.uncertainty["n_words"] == {letter: d["num_probe_true_positives"] for letter, d in details.items()}
    rng = np.random.default_rng(1)
    for metric, column, per_letter in (
        ("mean_absorption_fraction_score", "absorption_fraction", "mean_absorption_fraction"),
        ("mean_full_absorption_score", "is_full_absorption", "full_absorption_rate"),
    ):
        means = np.zeros(replicates)
        for letter, d in details.items():
            values = raw.loc[raw["letter"] == letter, column].astype(float).to_numpy()
            values = np.concatenate([values, np.zeros(d["num_probe_true_positives"] - len(values))])
            assert values.mean() == pytest.approx(d[per_letter], rel=1e-9, abs=1e-12)  # SAEBench's per-letter score
            means += values[rng.integers(len(values), size=(replicates, len(values)))].mean(axis=1) / len(details)
        se = result.metrics[f"absorption.{metric}.word_se"]
        assert se == pytest.approx(float(means.std()), rel=0.1, abs=1e-4), metric
    assert result.metrics["absorption.mean_absorption_fraction_score.word_se"] > 0
    # the split-latent count's bootstrap over the k-sparse probes' test words reproduced SAEBench's counts on the full
    # sample (else it would log no error: tests/test_evaluate.py checks the rule against SAEBench's own code)
    splits = result.uncertainty["split_features"]
    assert "inconsistent" not in splits and set(splits["per_letter_se"]) == set(details)
    assert "absorption.mean_num_split_features.word_se" in result.metrics  # (its value: tests/test_evaluate.py)


def test_absorption_is_not_applicable_where_saebench_prompts_overflow_the_context(experiment, pruned, tmp_path):
    config = saebench_config("absorption", experiment.evaluation, "m", "float32", pruned.tl, tiny=True)
    with pytest.raises(NotApplicable, match=r"run to \d+ tokens here, longer than the model's context of 64"):
        run_suite("absorption", pruned.tl, topk_sae("blocks.1.hook_resid_post"), config, tmp_path, "random")


def test_each_suite_is_keyed_by_its_own_sizes(experiment, small_experiment):
    from saecomp.saes import SAESource

    source = SAESource.parse("runs:/0123456789abcdef0123456789abcdef/saes/pruned-0.25")
    suites = {"evaluation.suites": ["core", "absorption", "scr", "tpp", "sparse_probing"]}

    def keys(overrides: dict | None = None, model: str = "m", variant: str = "pruned25") -> dict[str, str]:
        return evaluate_step.suite_keys(load_experiment(small_experiment, {**suites, **(overrides or {})}), str(small_experiment),
                                        source, model, variant)  # fmt: skip

    base = keys()
    changed = keys({"evaluation.scr_tpp_train_size": 128})
    # the labelled data's rows follow the largest sizes, and SAEBench samples from all of them
    assert {s for s in base if base[s] != changed[s]} == {"scr", "tpp", "sparse_probing"}
    changed = keys({"evaluation.absorption_max_k": 5})
    assert {s for s in base if base[s] != changed[s]} == {"absorption"}
    other_model = keys(model="m2")
    assert all(base[s] != other_model[s] for s in base)
    changed = keys({"evaluation.seed": 7})
    assert {s for s in base if base[s] != changed[s]} == {"absorption", "scr", "tpp", "sparse_probing"}  # core draws nothing
    # the variant is the column compare shows a run in: the same SAE as another variant is another run
    assert all(base[s] != keys(variant="selected")[s] for s in base)
    # WANDA's calibration does not reach an evaluation but through the model (its prune_llm run, in the label); the
    # test pool core reads does
    assert keys({"calibration.seed": 7, "calibration.n_sequences": 12}) == base
    other_text = keys({"held_out.documents": 500})
    assert {s for s in base if base[s] != other_text[s]} == {"core"}  # the other suites read their labelled data


def test_the_evaluation_seed_is_saebenchs_random_seed(experiment, pruned):
    reseeded = experiment.evaluation.model_copy(update={"seed": 7})
    for suite in ("sparse_probing", "scr", "tpp", "absorption"):
        assert saebench_config(suite, experiment.evaluation, "m", "float32", pruned.tl, tiny=True).random_seed == 42  # SAEBench's
        assert saebench_config(suite, reseeded, "m", "float32", pruned.tl, tiny=True).random_seed == 7
    assert evaluate_lib.ravel_config(reseeded, "tok", "float32", Path("/tmp/x"), tiny=True).random_seed == 7


def all_runs():
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=2000)


def test_a_suites_library_warnings_go_to_its_log_and_saecomps_own_to_the_terminal(tmp_path):
    """During a suite, the libraries' warnings (scikit-learn's deprecations: about a thousand lines per cold pipeline)
    go to the suite's saebench_output log beside SAEBench's prints; saecomp's own (an error falling back, twins not
    computed) still reach the terminal."""
    import warnings

    from entrypoints.evaluate import library_warnings_to

    ours = str(Path(evaluate_lib.__file__).resolve())
    log_path = tmp_path / "suite.log"
    with pytest.warns(UserWarning, match="could not be traced") as shown, log_path.open("w") as log:
        warnings.simplefilter("always")
        with library_warnings_to(log, sys.stderr):
            warnings.warn_explicit("'penalty' was deprecated", FutureWarning, "/venv/site-packages/sklearn/linear_model/_logistic.py", 1)
            warnings.warn_explicit("tpp: the probe tests could not be traced (x)", UserWarning, ours, 1)
    logged = log_path.read_text()
    assert "FutureWarning: 'penalty' was deprecated" in logged and "could not be traced" not in logged
    assert [str(w.message) for w in shown] == ["tpp: the probe tests could not be traced (x)"]


def test_a_suites_library_log_records_go_to_its_log_and_elsewhere_where_they_went_before(tmp_path):
    """`datasets`' records during a suite ("Using the latest cached version of the dataset ...", about 45 lines per
    cold pipeline) go to the suite's log, and not also to the root logger's handler (which any module-level
    `logging.warning` call of a library installs, printing them on the terminal); another thread's, and any after the
    suite, go where they went before, root included."""
    import logging
    import threading

    from entrypoints.evaluate import _ToSuiteLog, library_warnings_to

    terminal: list[str] = []

    class Terminal(logging.Handler):
        def emit(self, record):
            terminal.append(record.getMessage())

    logger = logging.getLogger("datasets")
    at_root: list[str] = []

    class Root(logging.Handler):
        def emit(self, record):
            at_root.append(record.getMessage())

    root = Root()
    logging.getLogger().addHandler(root)
    log_path = tmp_path / "suite.log"
    with log_path.open("w") as log, library_warnings_to(log, sys.stderr):
        # the library's own handler now sits behind ours (pytest attaches its capture to non-propagating loggers too)
        (ours,) = [handler for handler in logger.handlers if isinstance(handler, _ToSuiteLog)]
        ours.before.append(Terminal())
        logging.getLogger("datasets.load").warning("Using the latest cached version of the dataset since LabHC/bias_in_bios is offline")
        other = threading.Thread(target=lambda: logger.warning("another thread's record"))
        other.start()
        other.join()
    logger.warning("after the suite")
    ours.before.pop()
    logging.getLogger().removeHandler(root)
    logged = log_path.read_text()
    assert "WARNING:datasets.load: Using the latest cached version" in logged and "another thread" not in logged and "after" not in logged
    assert terminal == ["another thread's record", "after the suite"]
    assert at_root == ["another thread's record", "after the suite"]  # propagated as before, the suite's record not
    with (tmp_path / "again.log").open("w") as log, library_warnings_to(log, sys.stderr):
        assert sum(isinstance(handler, _ToSuiteLog) for handler in logger.handlers) == 1  # installed once


def test_evaluate_step_runs_every_built_suite_and_a_failed_suite_fails_the_run(small_experiment, monkeypatch):
    from saecomp import evaluate as evaluate_lib
    from saecomp.tracking import find_finished_suite

    suites = "core,absorption,scr,tpp,sparse_probing"
    result = CliRunner().invoke(
        evaluate_step.main, ["--experiment", str(small_experiment), "--variant", "pretrained", "--suites", suites], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    runs = sorted((r for r in all_runs() if r.data.tags.get("saecomp.step") == "evaluate"), key=lambda r: r.info.start_time)
    run = runs[-1]
    assert run.info.status == "FINISHED" and run.data.params["suites"] == suites
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(run.info.run_id, "saebench")} == {
        f"saebench/{s}.json" for s in ("core", "scr", "tpp", "sparse_probing")
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "datasets")} == {
        "datasets/LabHC__bias_in_bios",
        "datasets/canrager__amazon_reviews_mcauley_1and5",
    }
    # absorption: a reason and no number, and the run still finishes
    assert "reads the residual stream" in run.data.tags["saecomp.absorption.not_applicable"]  # an attention SAE
    assert not [m for m in run.data.metrics if m.startswith("absorption.") and m != "absorption.seconds"]
    for suite in ("core", "scr", "tpp", "sparse_probing"):
        assert run.data.metrics[f"{suite}.seconds"] > 0
        key = run.data.tags[f"saecomp.suite_key.{suite}"]
        found = find_finished_suite(suite, key)  # the oldest run with that suite's key: core may come from an earlier test
        assert found == run.info.run_id or (suite == "core" and client.get_run(found).data.tags[f"saecomp.suite_key.{suite}"] == key)
    assert "sparse_probing.sae_top_1_test_accuracy" in run.data.metrics and "scr.scr_dir1_threshold_2" in run.data.metrics
    # SAEBench's own prints (a line per probe and score) go to the run's saebench_output/, not to the terminal
    printed = Path(client.download_artifacts(run.info.run_id, "saebench_output/scr.log")).read_text()
    marker = next(line for line in printed.splitlines() if line.strip())  # SAEBench's first line
    assert len(printed.splitlines()) > 10 and marker not in result.output
    # ... and so do its progress bars (tqdm, on stderr), while saecomp's own progress lines stay on the terminal
    assert "Collecting activations" in printed and "Collecting activations" not in result.output
    assert "[evaluate] scr: done in" in result.output
    # sparse probing's standard errors, and the test-text counts and replicates behind them as an artifact
    assert "uncertainty/sparse_probing.json" in {a.path for a in client.list_artifacts(run.info.run_id, "uncertainty")}
    counted = json.loads(Path(client.download_artifacts(run.info.run_id, "uncertainty/sparse_probing.json")).read_text())
    assert {f"sparse_probing.{m}.bootstrap_se" for m in counted["se"]} <= set(run.data.metrics) and counted["samples"]
    assert "sae_top_1_test_accuracy" in counted["se"] and all(n > 0 for d in counted["n_test"].values() for n in d.values())
    # SCR's and TPP's padding-masked twins: a metric beside each of SAEBench's, per dataset in corrected/<suite>.json
    assert {a.path for a in client.list_artifacts(run.info.run_id, "corrected")} == {"corrected/scr.json", "corrected/tpp.json"}
    assert {"scr.scr_dir1_threshold_2_padding_masked", "tpp.tpp_threshold_2_total_metric_padding_masked"} <= set(run.data.metrics)
    corrected = json.loads(Path(client.download_artifacts(run.info.run_id, "corrected/tpp.json")).read_text())
    assert corrected["averaged"]["tpp_threshold_2_total_metric"] == run.data.metrics["tpp.tpp_threshold_2_total_metric_padding_masked"]

    def broken(*args, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(evaluate_lib, "run_scr_or_tpp", broken)
    result = CliRunner().invoke(
        evaluate_step.main, ["--experiment", str(small_experiment), "--variant", "pretrained", "--suites", "core,scr,sparse_probing"]
    )
    assert result.exit_code != 0
    failed = sorted((r for r in all_runs() if r.data.tags.get("saecomp.step") == "evaluate"), key=lambda r: r.info.start_time)[-1]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["saecomp.scr.failed"] == "RuntimeError: probe exploded"
    # the other suites ran and logged their numbers, but a FAILED run is never reused
    assert "core.ce_loss_score" in failed.data.metrics and "sparse_probing.llm_test_accuracy" in failed.data.metrics
    assert find_finished_suite("scr", failed.data.tags["saecomp.suite_key.scr"]) == run.info.run_id


def test_more_latents_than_the_sae_has_are_refused_before_any_run(small_experiment, tmp_path):
    import yaml

    config = yaml.safe_load(small_experiment.read_text())
    config["evaluation"].update({"suites": ["core", "tpp"], "scr_tpp_n_values": [2, 500]})
    path = tmp_path / "wide_n.yaml"
    path.write_text(yaml.safe_dump(config))
    evaluations = lambda: [r for r in all_runs() if r.data.tags.get("saecomp.step") == "evaluate"]  # noqa: E731
    before = len(evaluations())
    result = CliRunner().invoke(evaluate_step.main, ["--experiment", str(path), "--hook", "hook_resid_post", "--layer", "1"])
    assert result.exit_code == 2, result.output
    assert "evaluation.scr_tpp_n_values=[2, 500] asks for 500 latents, but the SAE has 128; valid: at most 128" in result.output
    # (the SAE itself may have been trained first: its width is what is checked) no evaluate run was opened
    assert len(evaluations()) == before


def test_online_labelled_data_is_the_commit_asked_for(experiment, tmp_path, monkeypatch):
    """Online, SAEBench's probing suites load their labelled Hub datasets unpinned (the newest commit). Inside
    `pinned_labelled_data` each load reads the experiment's revision, resolved to a commit, and the commits read are
    what the run tags; SAEBench's own loaders (both modules) are what read them. Through a local Hub, with the real
    `huggingface_hub` and `datasets` clients."""
    import dataclasses
    import shutil

    import datasets.config
    from hub_server import HubServer, pointed_at
    from huggingface_hub import HfApi
    from sae_bench.evals.scr_and_tpp import dataset_creation
    from sae_bench.sae_bench_utils import dataset_utils

    from saecomp.saebench_data import pinned_labelled_data

    token = "hf_labelledDataTestToken0123456789abcdef"
    corpus = experiment.world_config().corpus
    texts = []  # per commit: its training biographies
    with HubServer(token=token) as hub, pointed_at(hub, tmp_path / "hf_cache", token=token):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
        api = HfApi()
        api.create_repo(BIAS_IN_BIOS, repo_type="dataset")
        commits = []
        for index, seed in enumerate((0, 1)):  # two versions of the dataset: two worlds' biographies
            write_offline_datasets(dataclasses.replace(corpus, seed=seed), tmp_path / f"v{index}", 40, 10)
            upload = tmp_path / f"upload{index}" / "data"
            upload.mkdir(parents=True)
            for split in ("train", "test"):
                written = tmp_path / f"v{index}" / "parquet" / "LabHC__bias_in_bios" / f"{split}.parquet"
                shutil.copy(written, upload / f"{split}-00000-of-00001.parquet")
            commits.append(api.upload_folder(repo_id=BIAS_IN_BIOS, repo_type="dataset", folder_path=str(upload.parent)).oid)
            texts.append(set(pq.read_table(upload / "train-00000-of-00001.parquet").column("hard_text").to_pylist()))
        assert texts[0] != texts[1]
        originals = (dataset_utils.load_dataset, dataset_creation.load_dataset)
        for revisions, expected in (({BIAS_IN_BIOS: commits[0]}, 0), ({}, 1), ({BIAS_IN_BIOS: "main"}, 1)):
            with pinned_labelled_data(revisions) as read:
                train, _ = dataset_utils.get_multi_label_train_test_data("LabHC/bias_in_bios_class_set1", 40, 8, 42)  # sparse probing's
                scr_train, _ = dataset_creation.get_train_test_data(  # SCR's, through its own module
                    "LabHC/bias_in_bios_class_set1", True, 40, 8, 42, ("professor", "nurse"), ("male", "female")
                )
            assert read == {BIAS_IN_BIOS: commits[expected]}, revisions
            for drawn in (train, scr_train):
                drawn_texts = {t for class_texts in drawn.values() for t in class_texts}
                assert drawn_texts and drawn_texts <= texts[expected] and not drawn_texts <= texts[1 - expected]
        assert (dataset_utils.load_dataset, dataset_creation.load_dataset) == originals  # restored
        # the repositories the suites will read are resolved on entry: a run that loads saved activations (a shared
        # model side) and never calls the loader still names its data
        with pinned_labelled_data({BIAS_IN_BIOS: commits[0]}, [BIAS_IN_BIOS]) as read:
            assert read == {BIAS_IN_BIOS: commits[0]}
        # offline (datasets' own flag) nothing is resolved or asked of the Hub, and the data is not claimed to be a commit
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        asked = len(hub.requests)
        with pinned_labelled_data({BIAS_IN_BIOS: commits[0]}, [BIAS_IN_BIOS]) as read:
            train, _ = dataset_utils.get_multi_label_train_test_data("LabHC/bias_in_bios_class_set1", 40, 8, 42)
        assert train and len(hub.requests) == asked
        assert read[BIAS_IN_BIOS].startswith(commits[0]) and "not verified" in read[BIAS_IN_BIOS]
    # every repository SAEBench's loaders read for one of its datasets can be pinned, and no other
    from sae_bench.sae_bench_utils import dataset_info

    from saecomp.saebench_data import LABELLED_DATA_REPOS, hub_repo_of

    assert LABELLED_DATA_REPOS == sorted({hub_repo_of(name) for name in dataset_info.chosen_classes_per_dataset})


# A stand-in for codeparrot/github-code's loading script (the real one cannot be downloaded here), with the interface
# SAEBench's loader uses: a `languages` config argument and parquet shards under data/, relative to the script, which
# `datasets` resolves at the script's own revision and, streaming, reads through HfFileSystem in byte ranges.
GITHUB_CODE_STAND_IN = """
import pyarrow.parquet as pq
import datasets


class GithubCodeConfig(datasets.BuilderConfig):
    def __init__(self, *args, languages=("all",), **kwargs):
        super().__init__(*args, name="+".join(languages), **kwargs)
        self.languages = set(languages)


class GithubCode(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIG_CLASS = GithubCodeConfig
    BUILDER_CONFIGS = [GithubCodeConfig(languages=["all"])]
    DEFAULT_CONFIG_NAME = "all"

    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({"code": datasets.Value("string"), "language": datasets.Value("string")}))

    def _split_generators(self, dl_manager):
        files = dl_manager.download(["data/train-00000-of-00001.parquet"])
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"files": files})]

    def _generate_examples(self, files):
        key = 0
        for file in files:
            with open(file, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                    for row in batch.to_pylist():
                        if "all" in self.config.languages or row["language"] in self.config.languages:
                            yield key, {"code": row["content"], "language": row["language"]}
                            key += 1
"""


EUROPARL, GITHUB_CODE, AG_NEWS = "Helsinki-NLP/europarl", "codeparrot/github-code", "fancyzhx/ag_news"
EUROPARL_PAIRS = ["en-fr", "fr-it", "de-en", "es-fr", "nl-pt"]  # SAEBench's get_europarl_dataset reads one pair per language


def _words(rng, version: int, count: int) -> str:
    return " ".join(f"v{version}{rng.choice('abcdefgh')}{rng.randrange(1000)}" for _ in range(count))


def write_streamed_labelled_data(folder: Path, version: int) -> dict[str, set[str]]:
    """Version ``version`` of the three labelled Hub datasets the tiny world has no counterpart of, under
    folder/<repo>, in the layouts SAEBench's calls imply (the real repositories cannot be read here): europarl as one
    parquet config per language pair, github-code as a loading script (`GITHUB_CODE_STAND_IN`) over parquet shards
    under data/, ag_news as train and test parquet. Enough rows for sparse probing at 40 train and 10 test examples.
    Returns each repository's texts as SAEBench draws them."""
    import random

    import pyarrow as pa

    rng = random.Random(version)
    texts: dict[str, set[str]] = {EUROPARL: set(), GITHUB_CODE: set(), AG_NEWS: set()}
    configs = []
    for pair in EUROPARL_PAIRS:
        rows = [{language: _words(rng, version, 8) for language in pair.split("-")} for _ in range(30)]
        texts[EUROPARL] |= {text for row in rows for text in row.values()}
        (folder / EUROPARL / pair).mkdir(parents=True)
        pq.write_table(pa.table({"translation": rows}), folder / EUROPARL / pair / "train-00000-of-00001.parquet")
        configs.append(f"- config_name: {pair}\n  data_files:\n  - split: train\n    path: {pair}/train-*\n")
    (folder / EUROPARL / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    from sae_bench.sae_bench_utils import dataset_info

    languages = dataset_info.chosen_classes_per_dataset[GITHUB_CODE] + ["Rust"]  # one SAEBench does not choose
    code = [_words(rng, version, 120) for _ in range(60 * len(languages))]  # over the 534 characters SAEBench needs
    texts[GITHUB_CODE] = {c[150:] for c in code}  # SAEBench skips each file's first 150 characters
    (folder / GITHUB_CODE / "data").mkdir(parents=True)
    table = pa.table({"content": code, "language": [languages[i % len(languages)] for i in range(len(code))]})
    pq.write_table(table, folder / GITHUB_CODE / "data" / "train-00000-of-00001.parquet", row_group_size=32)
    (folder / GITHUB_CODE / "github-code.py").write_text(GITHUB_CODE_STAND_IN)
    (folder / AG_NEWS / "data").mkdir(parents=True)
    for split, size in (("train", 80), ("test", 40)):
        news = [_words(rng, version, 10) for _ in range(size)]
        texts[AG_NEWS] |= set(news)
        labels = pa.array([i % 4 for i in range(size)], pa.int64())
        pq.write_table(pa.table({"text": news, "label": labels}), folder / AG_NEWS / "data" / f"{split}-00000-of-00001.parquet")
    return texts


def test_online_streamed_and_scripted_labelled_data_is_the_commit_asked_for(tmp_path, monkeypatch):
    """The three labelled datasets a real model's sparse probing reads besides bias_in_bios and Amazon, each loaded by
    SAEBench's own loader (`get_multi_label_train_test_data`) inside `pinned_labelled_data`, through a local Hub with
    the real `huggingface_hub` and `datasets` clients: europarl streamed from per-language-pair parquet configs,
    github-code streamed through a loading script with `trust_remote_code` and a `languages` argument, ag_news loaded
    whole. Each repository gets two commits of different text; pinned to the first, every text drawn is the first's,
    and the streamed parquet is read in byte ranges (a server that ignored them would hand back the whole file as the
    slice asked for)."""
    from hub_server import HubServer, pointed_at
    from huggingface_hub import HfApi
    from sae_bench.sae_bench_utils import dataset_info, dataset_utils

    from saecomp.saebench_data import pinned_labelled_data

    token = "hf_streamedDataTestToken0123456789abcdef"
    with HubServer(token=token) as hub, pointed_at(hub, tmp_path / "hf_cache", token=token):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
        api = HfApi()
        commits: dict[str, list[str]] = {EUROPARL: [], GITHUB_CODE: [], AG_NEWS: []}
        texts = [write_streamed_labelled_data(tmp_path / f"v{version}", version) for version in (0, 1)]
        for repo in commits:
            api.create_repo(repo, repo_type="dataset")
            for version in (0, 1):
                upload = api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(tmp_path / f"v{version}" / repo))
                commits[repo].append(upload.oid)
        for revisions, expected in (({repo: versions[0] for repo, versions in commits.items()}, 0), ({}, 1)):
            for repo in commits:
                with pinned_labelled_data(revisions) as read:
                    train, test = dataset_utils.get_multi_label_train_test_data(repo, 40, 10, 42)  # sparse probing's call
                assert read == {repo: commits[repo][expected]}, (repo, revisions)
                assert sorted(train) == sorted(dataset_info.chosen_classes_per_dataset[repo]), repo
                assert all(len(class_texts) == 20 for class_texts in train.values()), repo  # binary tasks: half each
                drawn = {text for split in (train, test) for class_texts in split.values() for text in class_texts}
                assert drawn <= texts[expected][repo] and not drawn & texts[1 - expected][repo], repo
        for repo in (EUROPARL, GITHUB_CODE):  # streamed: read in byte ranges
            assert any(r.byte_range and r.path.endswith(".parquet") and f"/{repo}/" in r.path for r in hub.requests), repo


def serve_text(api, repo: str, folder: Path) -> None:
    """A text dataset repository on the local Hub (one parquet shard of a `train` split): core's test text."""
    import pyarrow as pa

    (folder / "data").mkdir(parents=True)
    documents = [" ".join(f"the quick brown fox {i} jumps over the lazy dog {j}" for j in range(6)) for i in range(120)]
    pq.write_table(pa.table({"text": documents}), folder / "data" / "train-00000-of-00001.parquet")
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(folder))


def serve_labelled_data(api, corpus, tmp_path: Path, streamed: bool = False) -> dict[str, list[str]]:
    """Two commits each of SAEBench's labelled repositories on the local Hub: bias_in_bios and Amazon reviews from
    the tiny world (its seed 0, then 1), and with ``streamed`` europarl, github-code and ag_news. Returns each
    repository's commits, oldest first."""
    import dataclasses
    import shutil

    commits: dict[str, list[str]] = {}
    for version in (0, 1):
        folder = tmp_path / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        if streamed:
            write_streamed_labelled_data(folder, version)
        write_offline_datasets(dataclasses.replace(corpus, seed=version), tmp_path / f"bios{version}", 40, 10)
        for repo in (BIAS_IN_BIOS, AMAZON):
            (folder / repo / "data").mkdir(parents=True)
            for split in ("train", "test"):
                written = tmp_path / f"bios{version}" / "parquet" / repo.replace("/", "__") / f"{split}.parquet"
                shutil.copy(written, folder / repo / "data" / f"{split}-00000-of-00001.parquet")
        for repo in (BIAS_IN_BIOS, AMAZON, *((EUROPARL, GITHUB_CODE, AG_NEWS) if streamed else ())):
            if version == 0:
                api.create_repo(repo, repo_type="dataset")
            upload = api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(folder / repo))
            commits.setdefault(repo, []).append(upload.oid)
    return commits


def test_evaluate_online_reads_the_model_the_text_and_all_eight_labelled_datasets_from_the_hub(experiment, tmp_path):
    """The evaluate step as gemma-2-2b.yaml runs it online (not the tiny world's path), end to end in its own process,
    against a local Hub with the real clients: the model `google/gemma-2-2b` (random weights in a small Gemma-2
    config), core's test text streamed from `monology/pile-uncopyrighted`, and sparse probing on all eight of SAEBench's
    default datasets, pinned: bias_in_bios and Amazon loaded whole, europarl and github-code streamed (github-code
    through its loading script), ag_news whole. Each labelled repository has two commits; the experiment pins the
    first, and the run names exactly those commits. No file of the model or data is in any cache beforehand."""

    import yaml
    from conftest import ROOT, random_hf_model, tokenizer_for
    from hub_server import HubServer, pointed_at
    from huggingface_hub import HfApi
    from sae_lens import JumpReLUSAEConfig

    token = "hf_onlineEvaluateTestToken0123456789abcd"
    corpus = experiment.world_config().corpus
    with HubServer(token=token) as hub, pointed_at(hub, tmp_path / "hf_cache", token=token):
        api = HfApi()
        model_folder = tmp_path / "gemma"
        random_hf_model("gemma2").save_pretrained(model_folder)
        tokenizer_for().save_pretrained(model_folder)
        api.create_repo("google/gemma-2-2b")
        api.upload_folder(repo_id="google/gemma-2-2b", folder_path=str(model_folder))
        serve_text(api, "monology/pile-uncopyrighted", tmp_path / "pile")
        commits = serve_labelled_data(api, corpus, tmp_path, streamed=True)
        sae = SAE.from_dict(JumpReLUSAEConfig(d_in=32, d_sae=64).to_dict())
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                values = torch.rand(p.shape, generator=generator)  # a threshold: small and positive
                p.copy_(values * 0.1 if name == "threshold" else torch.randn(p.shape, generator=generator))
        sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = "blocks.1.hook_resid_post", "google/gemma-2-2b"
        sae.cfg.metadata.prepend_bos, sae.cfg.metadata.context_size = True, 16
        sae.save_model(str(tmp_path / "sae"))
        config = yaml.safe_load((ROOT / "experiments" / "gemma-2-2b.yaml").read_text())
        shrunk_online(config, "online-gemma", commits, dtype="float32")
        config["evaluation"].update({
            "suites": ["core", "sparse_probing"], "probe_context_length": 32,
            "sparse_probing_train_size": 40, "sparse_probing_test_size": 10, "sparse_probing_k": [1, 2],
        })  # fmt: skip
        client, run = evaluate_in_its_own_process(tmp_path, config, str(tmp_path / "sae"))
        requests = list(hub.requests)
    pinned = dict(entry.split("@") for entry in run.data.tags["saecomp.labelled_data"].split(", "))
    assert pinned == {repo: versions[0] for repo, versions in commits.items()}
    metrics = run.data.metrics
    assert math.isfinite(metrics["core.ce_loss_score"]) and math.isfinite(metrics["core.explained_variance"])
    assert 0 <= metrics["sparse_probing.sae_top_1_test_accuracy"] <= 1
    output = json.loads(Path(client.download_artifacts(run.info.run_id, "saebench/sparse_probing.json", str(tmp_path / "out"))).read_text())
    from saecomp.saebench_data import SAEBENCH_SPARSE_PROBING_DATASETS

    evaluated = sorted(detail["dataset_name"].removesuffix("_results") for detail in output["eval_result_details"])  # SAEBench names
    assert evaluated == sorted(SAEBENCH_SPARSE_PROBING_DATASETS)
    paths = {r.path for r in requests}
    assert any("/google/gemma-2-2b/resolve/" in p for p in paths)
    assert any("/datasets/monology/pile-uncopyrighted/resolve/" in p for p in paths)
    assert_read_at_their_first_commits(paths, commits)
    assert any(r.byte_range for r in requests if f"/datasets/{GITHUB_CODE}/" in r.path)


def shrunk_online(config: dict, name: str, commits: dict, **fields) -> None:
    """An experiment file's config (GPT-2's, Gemma's) at test sizes, in place: its model, hooks' layer 1 and SAE
    settings kept, on the CPU, with small calibration, held-out and core sizes, reading each labelled Hub dataset at
    its first served commit. The suites and their sizes are the caller's (``config["evaluation"]``)."""
    config.update(
        name=name, device="cpu", **fields,
        calibration={**config["calibration"], "documents": 30, "n_sequences": 8, "seq_len": 32},
        held_out={"documents": 30, "n_sequences": 4, "seq_len": 32},
        sae={**config["sae"], "hooks": ["hook_resid_post"], "layers": [1], "context_size": 16},
    )  # fmt: skip
    config["evaluation"] = {
        "n_sequences": 16, "context_size": 16, "batch_size_prompts": 4, "n_reconstruction_batches": 2,
        "n_sparsity_variance_batches": 2, "labelled_data_revisions": {repo: versions[0] for repo, versions in commits.items()},
    }  # fmt: skip


def evaluate_in_its_own_process(tmp_path: Path, config: dict, sae: str):
    """`python -m entrypoints.evaluate` on the experiment ``config`` (written to ``online.yaml``) and ``sae``, against
    the dense model, in the environment `hub_server.pointed_at` set (the local Hub, online, the token, a fresh Hugging
    Face cache) with fresh datasets and modules caches and its own store. Returns the store's client and the
    FINISHED evaluate run."""
    import os
    import subprocess
    import sys

    import yaml
    from conftest import ROOT

    (tmp_path / "online.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "SAECOMP_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "entrypoints.evaluate", "--experiment", str(tmp_path / "online.yaml"),
               "--sae", sae, "--model", "dense", "--variant", "pretrained"]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-6000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(config["name"]).experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("saecomp.step") == "evaluate"]
    assert run.info.status == "FINISHED"
    return client, run


def assert_read_at_their_first_commits(paths: set[str], commits: dict[str, list[str]]) -> None:
    for repo in commits:  # every labelled dataset was read at its first commit, none at its second
        read = {p for p in paths if p.startswith(f"/datasets/{repo}/resolve/")}
        assert read and all(commits[repo][0] in p for p in read), (repo, read)


def test_evaluate_online_splices_gpt2s_layer_norm_release_in_and_scores_tpp_on_pinned_data(experiment, tmp_path):
    """The evaluate step as gpt2-small.yaml runs it online, in its own process against a local Hub with the real
    clients: `gpt2` at GPT-2 small's widths (random weights, two blocks), core's text from `Skylion007/openwebtext`, and
    the SAE named as the file names it, the release `gpt2-small-resid-post-v5-32k` (TopK, 32,768 latents, layer-norm
    inputs, at its real shape: `tests/releases.py`), fetched through SAELens's registry; TPP on bias_in_bios and Amazon
    reviews pinned to the first of two commits. A layer-norm SAE must decode what it just encoded: core's splice and
    TPP's ablations (SAEBench's ablation code is SCR's too) do, and the padding-masked twins and the standard errors
    come out. SCR at 32,768 latents would add about 20 s of SAELens's dense encodes on these cores and nothing this
    test does not see through TPP."""
    import yaml
    from conftest import ROOT, tokenizer_for
    from hub_server import HubServer, pointed_at
    from huggingface_hub import HfApi
    from releases import wide_hf_model, write_release_files
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    token = "hf_onlineEvaluateTestToken0123456789abcd"
    config = yaml.safe_load((ROOT / "experiments" / "gpt2-small.yaml").read_text())
    release = config["sae"]["pretrained"]["hook_resid_post"]
    sae_id = release["sae_id"].format(layer=1)
    with HubServer(token=token) as hub, pointed_at(hub, tmp_path / "hf_cache", token=token):
        api = HfApi()
        wide_hf_model("gpt2").save_pretrained(tmp_path / "gpt2")
        tokenizer_for().save_pretrained(tmp_path / "gpt2")
        api.create_repo("openai-community/gpt2")
        hub.add_alias("gpt2", "openai-community/gpt2")  # the file's `gpt2`, as the Hub answers it
        api.upload_folder(repo_id="gpt2", folder_path=str(tmp_path / "gpt2"))
        serve_text(api, config["data"]["dataset"], tmp_path / "owt")
        commits = serve_labelled_data(api, experiment.world_config().corpus, tmp_path)
        repo_id = get_pretrained_saes_directory()[release["release"]].repo_id
        write_release_files(tmp_path / "release", release["release"], sae_id, layer=1)
        api.create_repo(repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=str(tmp_path / "release"))
        shrunk_online(config, "online-gpt2", commits)
        config["evaluation"].update({
            "suites": ["core", "tpp"], "probe_context_length": 16,
            "scr_tpp_train_size": 32, "scr_tpp_test_size": 16, "scr_tpp_n_values": [2, 5],
        })  # fmt: skip
        client, run = evaluate_in_its_own_process(tmp_path, config, f"{release['release']}:{sae_id}")
        requests = list(hub.requests)
    tags, metrics = run.data.tags, run.data.metrics
    assert dict(entry.split("@") for entry in tags["saecomp.labelled_data"].split(", ")) == {r: v[0] for r, v in commits.items()}
    assert not [name for name in tags if name.endswith((".failed", ".se_failed", ".padding_masked_failed"))], tags
    assert math.isfinite(metrics["core.ce_loss_score"]) and metrics["core.l0"] == pytest.approx(32)  # TopK k 32
    for metric in ("tpp_threshold_2_total_metric", f"tpp_threshold_2_total_metric{evaluate_lib.PADDING_MASKED}"):
        assert math.isfinite(metrics[f"tpp.{metric}"]) and metrics[f"tpp.{metric}.bootstrap_se"] >= 0, metric
    saebench_core = json.loads(Path(client.download_artifacts(run.info.run_id, "saebench/core.json", str(tmp_path / "out"))).read_text())
    assert saebench_core["sae_cfg_dict"]["normalize_activations"] == "layer_norm"  # the release's, as SAEBench saw it
    paths = {r.path for r in requests}
    assert any(f"/{repo_id}/resolve/" in p for p in paths) and any(p.startswith("/gpt2/resolve/") for p in paths)  # by its old id
    assert any(f"/datasets/{config['data']['dataset']}/resolve/" in p for p in paths)
    assert_read_at_their_first_commits(paths, commits)
