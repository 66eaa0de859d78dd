"""RAVEL: SAEBench's own code on a tiny Gemma-2 that knows the world's city facts, with the world's facts written
where SAEBench reads RAVEL's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from saecomp.config import EvaluationConfig
from saecomp.evaluate import NotApplicable, decoder_layers_as_tuples, ravel_config, ravel_not_applicable, run_ravel
from saecomp.models import load_model
from saecomp.saebench_data import RAVEL_ATTRIBUTE_TEMPLATES, write_ravel_files
from saecomp.world.build import TinyModelConfig, WorldConfig, build_world
from saecomp.world.text import CorpusConfig
from saecomp.world.text import build_world as world_facts

# A world of 30 cities whose documents are mostly city facts: a 2-layer tiny-gemma2 learns them in about half a
# minute (the default world's 160 cities take tiny-gemma2.yaml's 1000 steps).
FACT_CORPUS = CorpusConfig(n_documents=600, n_cities=30, kind_weights=(0.1, 0.1, 0.6, 0.2))


@pytest.fixture(scope="module")
def fact_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("fact_world")
    model = TinyModelConfig("gemma2", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=64, train_steps=1000)
    build_world(WorldConfig(corpus=FACT_CORPUS, vocab_size=1024, models={"tiny-gemma2": model}), out, log=lambda line: None)
    return out


def fact_config(fact_world, tmp_path, pairs: int):
    """SAEBench's RAVEL config for the fact world's tiny-gemma2, its files written where RAVEL reads them."""
    write_ravel_files(FACT_CORPUS, tmp_path / "ravel")
    sizes = EvaluationConfig(ravel_pairs_per_attribute=pairs)
    return ravel_config(sizes, str(fact_world / "tiny-gemma2"), "float32", tmp_path / "ravel", True)


def resid_sae(layer: int, d_in: int = 64, seed: int = 0) -> SAE:
    sae = SAE.from_dict(
        {"architecture": "topk", "d_in": d_in, "d_sae": 4 * d_in, "k": 8, "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return sae


def test_ravel_files_hold_the_world_facts_under_saebench_names(tmp_path):
    counts = write_ravel_files(FACT_CORPUS, tmp_path)
    base = tmp_path / "base"
    attributes = json.loads((base / "ravel_city_entity_attributes.json").read_text())
    world = world_facts(FACT_CORPUS)
    assert counts == {"entities": 30, "prompts": 30 * 3 * 4} and set(attributes) == set(world.cities)
    for city, facts in attributes.items():
        country = world.cities[city]
        assert facts == {"Country": country, "Continent": world.countries[country][0], "Language": world.countries[country][1]}
    templates = json.loads((base / "ravel_city_attribute_to_prompts.json").read_text())
    assert set(templates) == set(RAVEL_ATTRIBUTE_TEMPLATES)
    assert all(t.count("%s") == 1 and t.endswith(RAVEL_ATTRIBUTE_TEMPLATES[a]) for a, ts in templates.items() for t in ts)
    splits = json.loads((base / "ravel_city_entity_to_split.json").read_text())
    assert set(splits.values()) == {"train", "val"} and set(splits) == set(attributes)
    again = tmp_path / "again"
    write_ravel_files(FACT_CORPUS, again)
    assert all((base / f.name).read_bytes() == f.read_bytes() for f in (again / "base").iterdir())


def test_tiny_gemma2_tokenizer_adds_its_own_bos_as_gemmas_does(fact_world):
    """SAEBench's RAVEL finds the entity's last token as len(encode(remainder)) from the end, which counts the BOS
    Gemma's tokenizer adds; and it masks padding by id, so BOS and padding must differ."""
    from sae_bench.evals.ravel.generation import custom_left_padding
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fact_world / "tiny-gemma2")
    assert len({tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id}) == 3
    city = next(iter(world_facts(FACT_CORPUS).cities))
    ids = tokenizer.encode(f"{city} is a city in")
    assert ids[0] == tokenizer.bos_token_id and tokenizer(city, add_special_tokens=False)["input_ids"][0] == ids[1]
    entity_position = -len(tokenizer.encode(" is a city in"))  # SAEBench's own rule (instance.py)
    assert tokenizer.decode(ids[: len(ids) + entity_position + 1], skip_special_tokens=True) == city
    padded, mask = custom_left_padding(tokenizer, [ids, ids[:3]])
    assert mask[0].all() and mask[1].sum() == 3  # BOS is attended to, padding is not


def test_decoder_layers_look_as_saebench_ravel_hooks_expect(fact_world):
    """transformers 5 decoder layers return a tensor; SAEBench's hooks read outputs[0] and return a tuple."""
    from sae_bench.sae_bench_utils import activation_collection

    model = load_model("tiny-gemma2", fact_world / "tiny-gemma2").hf
    ids = torch.tensor([[1, 40, 41, 42]])
    clean = model(input_ids=ids).logits
    seen = {}

    def zero_last(module, inputs, outputs):
        seen["shape"] = tuple(outputs[0].shape)
        outputs[0][:, -1] = 0
        return (outputs[0], *outputs[1:])

    with decoder_layers_as_tuples():
        handle = activation_collection.get_module(model, 0).register_forward_hook(zero_last)
        patched = model(input_ids=ids).logits
        handle.remove()
    assert seen["shape"] == (1, 4, 64)  # [batch, pos, d_model], not one sequence
    assert torch.equal(patched[:, :-1], clean[:, :-1]) and not torch.allclose(patched[:, -1], clean[:, -1])
    assert torch.equal(model(input_ids=ids).logits, clean)  # the hook and the adapter are gone
    assert activation_collection.get_module(model, 0) is model.model.layers[0]


def test_ravel_keeps_the_known_entities_and_gives_finite_validated_scores(fact_world, tmp_path):
    import sae_bench

    loaded = load_model("tiny-gemma2", fact_world / "tiny-gemma2")
    config = fact_config(fact_world, tmp_path, pairs=100)
    ravel_package = Path(sae_bench.__file__).parent / "evals" / "ravel"
    before = {p.name for p in ravel_package.rglob("*")}
    result = run_ravel(loaded.hf, resid_sae(0), config, tmp_path / "out", "random-sae", "tiny-gemma2-test")
    metrics = result.metrics
    assert metrics["ravel.n_entities_kept"] >= 20 and metrics["ravel.n_prompts"] == 360
    assert 0.5 < metrics["ravel.fact_accuracy"] <= 1.0
    for name in ("disentanglement_score", "cause_score", "isolation_score"):
        assert math.isfinite(metrics[f"ravel.{name}"]) and 0.0 <= metrics[f"ravel.{name}"] <= 1.0
    assert metrics["ravel.disentanglement_score"] == pytest.approx((metrics["ravel.cause_score"] + metrics["ravel.isolation_score"]) / 2)
    assert 0.0 <= metrics["ravel.residual_patch_cause"] <= 1.0
    output = result.output
    assert output["eval_config"]["model_name"] == "tiny-gemma2-test"  # not the folder SAEBench read the tokenizer from
    assert set(output["eval_result_unstructured"]["city_results"]) == {f"city_{a}" for a in RAVEL_ATTRIBUTE_TEMPLATES}
    # per entity class and cause attribute, the rows the headline scores average
    for name in ("disentanglement_score", "cause_score", "isolation_score"):
        per_attribute = [metrics[f"ravel.city.{a}.{name}"] for a in RAVEL_ATTRIBUTE_TEMPLATES]
        assert metrics[f"ravel.{name}"] == pytest.approx(sum(per_attribute) / len(per_attribute))
    # every validation pair traced (its two entities and SAEBench's own verdict on it), which gives back SAEBench's every
    # score exactly (else the errors fall back to the binomial ones, with the reason): the errors are two-way
    # cluster-robust over the entities the pairs share
    boot = result.uncertainty
    assert boot["se_kind"] == "cluster_se" and "untraced" not in boot, boot.get("untraced")
    assert 2 <= boot["entities"]["city"] <= metrics["ravel.n_entities_kept"]
    assert "saecomp.ravel.se_untraced" not in result.tags
    for name in ("disentanglement_score", "cause_score", "isolation_score"):
        for metric in [f"ravel.{name}", *(f"ravel.city.{a}.{name}" for a in RAVEL_ATTRIBUTE_TEMPLATES)]:
            assert math.isfinite(metrics[f"{metric}.cluster_se"]) and f"{metric}.binomial_se" not in metrics, metric
            # never below the variance within pairs of the same two entities (which the binomial one is, but for repeats)
            assert metrics[f"{metric}.cluster_se"] >= 0.5 * boot["binomial_se"][metric.removeprefix("ravel.")], metric
    # beside them, the binomial errors over the validation pairs each score is a mean over: a score times its count of
    # pairs is a whole number of successful interventions (a wrong count would not be), and the errors combine as
    # SAEBench averages the scores
    pairs, binomial = boot["pairs"], boot["binomial_se"]
    assert set(pairs) == {f"city.{a}" for a in RAVEL_ATTRIBUTE_TEMPLATES}
    for attribute in RAVEL_ATTRIBUTE_TEMPLATES:
        counts = pairs[f"city.{attribute}"]
        assert counts["cause"] > 0 and counts["isolation"] > 0
        for score, n in (("cause_score", counts["cause"]), ("isolation_score", counts["isolation"])):
            value = metrics[f"ravel.city.{attribute}.{score}"]
            assert value * n == pytest.approx(round(value * n), abs=1e-6), (attribute, score, value, n)
            assert binomial[f"city.{attribute}.{score}"] == pytest.approx(math.sqrt(value * (1 - value) / n))
        both = [binomial[f"city.{attribute}.{s}"] for s in ("cause_score", "isolation_score")]
        assert binomial[f"city.{attribute}.disentanglement_score"] == pytest.approx(math.hypot(*both) / 2)
    for name in ("disentanglement_score", "cause_score", "isolation_score"):
        per_attribute = [binomial[f"city.{a}.{name}"] for a in RAVEL_ATTRIBUTE_TEMPLATES]
        assert binomial[name] == pytest.approx(math.hypot(*per_attribute) / len(per_attribute))
    # ours: the facts known over all prompts, the whole-residual swap's hits over its pairs (64 per attribute at most)
    accuracy = metrics["ravel.fact_accuracy"]
    assert metrics["ravel.fact_accuracy.binomial_se"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 360))
    pairs, ceiling = result.uncertainty["residual_patch_pairs"], metrics["ravel.residual_patch_cause"]
    assert 0 < pairs <= 64 * len(RAVEL_ATTRIBUTE_TEMPLATES) and ceiling * pairs == pytest.approx(round(ceiling * pairs), abs=1e-9)
    if 0 < ceiling < 1:
        assert metrics["ravel.residual_patch_cause.binomial_se"] == pytest.approx(math.sqrt(ceiling * (1 - ceiling) / pairs))
    # RAVEL switches gradients on and trains a mask: nothing of that leaks out
    assert all(p.requires_grad for p in loaded.hf.parameters()) and not loaded.hf.training
    assert {p.name for p in ravel_package.rglob("*")} == before  # every file went to our folders


def test_ravel_restores_the_callers_gradient_mode(fact_world, tmp_path):
    loaded = load_model("tiny-gemma2", fact_world / "tiny-gemma2")
    config = fact_config(fact_world, tmp_path, pairs=100)
    with torch.no_grad():
        run_ravel(loaded.hf, resid_sae(0), config, tmp_path / "out", "random-sae", "tiny-gemma2-test")
        assert not torch.is_grad_enabled()


def test_ravel_is_not_applicable_to_a_model_that_knows_too_few_facts(small_world, tmp_path):
    loaded = load_model("tiny-gemma2", small_world / "tiny-gemma2")  # 30 training steps: it knows no city
    write_ravel_files(CorpusConfig(n_documents=300), tmp_path / "ravel")
    config = ravel_config(EvaluationConfig(), str(small_world / "tiny-gemma2"), "float32", tmp_path / "ravel", True)
    with pytest.raises(NotApplicable, match="the model completes too few city facts for RAVEL"):
        run_ravel(loaded.hf, resid_sae(1, d_in=32), config, tmp_path / "out", "random-sae", "tiny-gemma2-test")
    assert not list((tmp_path / "out").glob("*.json"))  # no result was written


@pytest.mark.parametrize(
    "hook,architecture,expected",
    [
        ("blocks.2.hook_resid_post", "Gemma2ForCausalLM", None),
        ("blocks.2.hook_mlp_out", "Gemma2ForCausalLM", "this SAE reads blocks.2.hook_mlp_out"),
        ("blocks.2.attn.hook_z", "Gemma2ForCausalLM", "this SAE reads blocks.2.attn.hook_z"),
        ("blocks.2.hook_resid_post", "GPT2LMHeadModel", "this model is GPT2LMHeadModel"),
    ],
)
def test_ravel_applies_only_to_residual_saes_of_layouts_it_can_hook(hook, architecture, expected):
    reason = ravel_not_applicable(hook, architecture)
    assert reason is None if expected is None else expected in reason


def test_residual_patch_cause_is_zero_after_the_last_block(fact_world, tmp_path):
    """After the last block each position only meets the unembedding: swapping the entity token's residual there can
    never change the answer at the last token, whatever the model knows."""
    from saecomp.evaluate import residual_patch_cause

    loaded = load_model("tiny-gemma2", fact_world / "tiny-gemma2")
    config = fact_config(fact_world, tmp_path, pairs=100)
    from saecomp.evaluate import ravel_known_prompts

    kept = ravel_known_prompts(loaded.hf, config)
    share, pairs = residual_patch_cause(loaded.hf, kept, config, layer=1, pairs_per_attribute=16)
    assert share == 0.0 and 0 < pairs <= 16 * len(RAVEL_ATTRIBUTE_TEMPLATES)


def test_online_ravel_data_is_the_commit_asked_for_and_saebench_downloads_nothing_more(tmp_path):
    """Online, RAVEL's prompts come from a Hub dataset that SAEBench downloads unpinned (always the newest commit).
    `fetch_ravel_prompts` resolves the experiment's revision to a commit, downloads exactly that commit's JSON files
    where SAEBench reads them, and returns the commit (the run's ``saecomp.ravel.data`` tag); SAEBench's own loader
    then finds every file and asks the Hub for nothing. Through a local Hub, with the real client."""
    from hub_server import HubServer, pointed_at
    from huggingface_hub import HfApi
    from sae_bench.evals.ravel.instance import RAVELInstance

    from saecomp.evaluate import RAVEL_PROMPTS_REPO, fetch_ravel_prompts

    token = "hf_ravelDataTestToken0123456789abcdef"
    versions = []
    for name, corpus in (("first", FACT_CORPUS), ("second", CorpusConfig(n_documents=100, n_cities=12))):
        write_ravel_files(corpus, tmp_path / name)
        (tmp_path / name / "base" / "README.md").write_text("# RAVEL prompts\n")
        versions.append({f.name: f.read_bytes() for f in (tmp_path / name / "base").glob("*.json")})
    with HubServer(token=token) as hub, pointed_at(hub, tmp_path / "hf_cache", token=token):
        api = HfApi()
        api.create_repo(RAVEL_PROMPTS_REPO, repo_type="dataset")
        commits = [api.upload_folder(repo_id=RAVEL_PROMPTS_REPO, repo_type="dataset", folder_path=str(tmp_path / name / "base")).oid
                   for name in ("first", "second")]  # fmt: skip
        assert versions[0] != versions[1]
        for revision, expected, index in ((commits[0], commits[0], 0), ("main", commits[1], 1)):
            folder = tmp_path / f"artifacts-{index}"
            assert fetch_ravel_prompts(folder, revision) == expected
            fetched = {f.name: f.read_bytes() for f in (folder / "base").iterdir() if f.is_file()}
            assert fetched == versions[index]  # exactly that commit's JSON files, and no README
            asked = len(hub.requests)
            instance = RAVELInstance()
            instance.load_files("city", str(folder))  # SAEBench's own loader: every file is there, so no download
            assert len(hub.requests) == asked and instance.entityLBL_attrTYP_attrLBL
        # offline (HF_HUB_OFFLINE=1), from the Hugging Face cache alone: the same commit, the same files, no request
        from huggingface_hub import constants

        asked = len(hub.requests)
        constants.HF_HUB_OFFLINE = True
        try:
            assert fetch_ravel_prompts(tmp_path / "offline", commits[0]) == commits[0]
        finally:
            constants.HF_HUB_OFFLINE = False
        assert {f.name: f.read_bytes() for f in (tmp_path / "offline" / "base").iterdir()} == versions[0]
        assert len(hub.requests) == asked


def test_ravel_standard_errors_over_several_entity_classes_are_the_spread_of_saebenchs_own_averaging():
    """The real Gemma-2 file scores several entity classes (SAEBench's default selection: city and
    nobel_prize_winner, three cause attributes each), and a user's selection may give classes unequal numbers of
    attributes (the tiny world has only `city`). The headline errors must follow SAEBench's averaging (attributes
    within a class, then classes with SAEBench's own `average_results_dictionaries`), which differs from a flat mean
    over attributes exactly when the counts are unequal, as here. Checked against a simulation that redraws every
    validation pair's outcome and scores it with that averaging."""
    from sae_bench.evals.ravel.eval_config import RAVELEvalConfig
    from sae_bench.sae_bench_utils.general_utils import average_results_dictionaries

    from saecomp.evaluate import RAVEL_SCORES, ravel_uncertainty

    selection = {"city": ["Country", "Continent", "Language"], "nobel_prize_winner": ["Country of Birth"]}
    config = RAVELEvalConfig(entity_attribute_selection=selection)
    truth = {  # (entity, attribute) -> (cause score, cause pairs, isolation score, isolation pairs)
        ("city", "Country"): (0.6, 200, 0.9, 150),
        ("city", "Continent"): (0.3, 120, 0.7, 300),
        ("city", "Language"): (0.5, 80, 0.8, 60),
        ("nobel_prize_winner", "Country of Birth"): (0.4, 40, 0.95, 90),
    }
    calls, per_class = [], {}
    for (entity, attribute), (cause, n_cause, isolation, n_isolation) in truth.items():  # SAEBench's order
        calls.append({"cause_score": cause, "isolation_score": isolation, "n_cause": n_cause, "n_isolation": n_isolation})
        per_class.setdefault(f"{entity}_results", {})[f"{entity}_{attribute}"] = {
            "cause_score": cause, "isolation_score": isolation, "disentangle_score": (cause + isolation) / 2,
        }  # fmt: skip
    errors = ravel_uncertainty(calls, per_class, config)["se"]

    generator = torch.Generator().manual_seed(0)
    draws = 40_000

    def redrawn(p: float, n: int) -> torch.Tensor:  # [draws] shares of n pairs that succeed
        return torch.binomial(torch.full((draws,), float(n)), torch.full((draws,), p), generator=generator) / n

    per_entity: dict[str, dict[str, torch.Tensor]] = {}
    for (entity, attribute), (cause, n_cause, isolation, n_isolation) in truth.items():
        scores = {"cause_score": redrawn(cause, n_cause), "isolation_score": redrawn(isolation, n_isolation)}
        scores["disentangle_score"] = (scores["cause_score"] + scores["isolation_score"]) / 2
        for name, values in scores.items():
            assert errors[f"{entity}.{attribute}.{RAVEL_SCORES[name]}"] == pytest.approx(float(values.std()), rel=0.03), (entity, attribute)
            per_entity.setdefault(entity, {}).setdefault(name, []).append(values)
    # each class: the mean over its cause attributes (SAEBench's run_eval_single_dataset); then SAEBench's own averaging
    classes = {f"{entity}_results": {name: torch.stack(v).mean(0) for name, v in scores.items()} for entity, scores in per_entity.items()}
    headline = average_results_dictionaries(classes, list(selection))
    for theirs, ours in RAVEL_SCORES.items():
        assert errors[ours] == pytest.approx(float(headline[theirs].std()), rel=0.03), ours
    # what the simulation tells apart: a flat mean over the four attributes would weigh nobel_prize_winner's one
    # attribute a quarter, not a half, and its error would be far smaller
    flat = torch.cat([torch.stack(s["cause_score"]) for s in per_entity.values()]).mean(0)
    assert float(flat.std()) < 0.8 * errors["cause_score"]


def traced_ravel_run(design: dict, outcome_of, attributes=("Country", "Continent")) -> tuple[list, dict]:
    """Synthetic traced calls of RAVEL's one `city` class (``ravel_pair_counts``' records): per cause attribute, the
    pairs of ``design`` (kind -> [(base, source)], or a function of the attribute giving them) with
    ``outcome_of(attribute, cause, base, source)``, and SAEBench's per-attribute scores from them."""
    calls, per_class = [], {"city_results": {}}
    for attribute in attributes:
        drawn = design(attribute) if callable(design) else design  # per attribute, or the same pairs for all
        pairs = [(cause, base, source, bool(outcome_of(attribute, cause, base, source)))
                 for cause in (True, False) for base, source in drawn[cause]]  # fmt: skip
        scores = {}
        for score, kind in (("cause_score", True), ("isolation_score", False)):
            outcomes = [o for c, _, _, o in pairs if c == kind]
            scores[score] = sum(outcomes) / len(outcomes)
        calls.append({**scores, "n_cause": len(drawn[True]), "n_isolation": len(drawn[False]), "pairs": pairs})
        per_class["city_results"][f"city_{attribute}"] = {**scores, "disentangle_score": sum(scores.values()) / 2}
    return calls, per_class


def test_ravel_errors_count_the_entities_pairs_share():
    """RAVEL's validation pairs share entities (a city is the base of some pairs and the source of others, for every
    attribute): an entity the mask handles badly fails many pairs together. The error is the two-way cluster-robust one
    over the entities: where no two pairs share an entity it is exactly the binomial error; where outcomes follow the
    entities it matches the spread over redrawn worlds (entity effects and outcomes), which the binomial error falls
    far below. Untraced or inconsistent records fall back to the binomial error, with why."""
    import numpy as np
    from sae_bench.evals.ravel.eval_config import RAVELEvalConfig

    from saecomp.evaluate import ravel_standard_errors, ravel_uncertainty

    config = RAVELEvalConfig(entity_attribute_selection={"city": ["Country", "Continent"]})
    rng = np.random.default_rng(3)
    # no entity shared: each pair its own two cities
    fresh = lambda attribute: {kind: [(f"{attribute}{kind}b{i}", f"{attribute}{kind}s{i}") for i in range(60)] for kind in (True, False)}  # noqa: E731
    calls, per_class = traced_ravel_run(fresh, lambda *pair: rng.random() < 0.6)
    errors = ravel_standard_errors(calls, per_class, config)
    assert errors["se_kind"] == "cluster_se" and errors["entities"] == {"city": 480}
    binomial = ravel_uncertainty(calls, per_class, config)["se"]
    assert errors["se"].keys() == binomial.keys()
    assert all(errors["se"][name] == pytest.approx(binomial[name], rel=1e-12) for name in binomial)

    # 30 cities in 150 pairs of each kind: outcomes driven by the cities (the same for both attributes), redrawn
    cities = [f"city {i}" for i in range(30)]
    design = {kind: [tuple(rng.choice(cities, 2, replace=False)) for _ in range(150)] for kind in (True, False)}
    for strength in (1.2, 0.0):  # (seen: 0.074 against a spread of 0.078, binomial 0.029; with no entity effect 0.031 against 0.029)
        scores, estimated, closed = [], [], []
        for _ in range(300):
            effect = dict(zip(cities, rng.normal(0.0, strength, len(cities)), strict=True))
            calls, per_class = traced_ravel_run(design, lambda a, c, b, s, e=effect: rng.random() < 1 / (1 + math.exp(-(e[b] + e[s]))))
            result = ravel_standard_errors(calls, per_class, config)
            scores.append(calls[0]["cause_score"] / 2 + calls[1]["cause_score"] / 2)  # SAEBench's headline cause score
            estimated.append(result["se"]["cause_score"] ** 2)
            closed.append(result["binomial_se"]["cause_score"] ** 2)
        spread = float(np.std(scores, ddof=1))
        assert math.sqrt(np.mean(estimated)) == pytest.approx(spread, rel=0.2), strength  # and not conservative without effects
        if strength:
            assert math.sqrt(np.mean(closed)) < 0.6 * spread

    # what cannot be traced, or does not give SAEBench's scores, falls back
    untraced = [{**call, "pairs": None} for call in calls]
    assert "could not be traced" in ravel_standard_errors(untraced, per_class, config)["untraced"]
    off = {"city_results": {**per_class["city_results"], "city_Country": {**per_class["city_results"]["city_Country"], "cause_score": 0.0}}}
    fallback = ravel_standard_errors(calls, off, config)
    assert fallback["se_kind"] == "binomial_se" and "do not give SAEBench's cause_score" in fallback["untraced"]


def test_ravel_errors_are_the_sum_over_every_two_pairs_that_share_an_entity():
    """Exactly, on a small design with reversed and repeated pairs: the variance is the sum of a_p a_q over every two
    validation pairs (a pair with itself included) that share an entity in either role, a_p a pair's share of the
    score's deviation; where that falls below the sum over pairs of the same two entities ((a, b) and (b, a) alike),
    the latter. Checked for one attribute's cause score and for the headline one, whose pairs from both attributes
    share entities, over random outcomes, some of which the floor decides."""
    import numpy as np
    from sae_bench.evals.ravel.eval_config import RAVELEvalConfig

    from saecomp.evaluate import ravel_standard_errors

    config = RAVELEvalConfig(entity_attribute_selection={"city": ["Country", "Continent"]})
    design = {True: [("A", "B"), ("B", "A"), ("A", "B"), ("C", "D"), ("A", "C")],
              False: [("B", "C"), ("C", "B"), ("D", "A"), ("A", "D"), ("E", "A")]}  # fmt: skip
    rng = np.random.default_rng(0)
    floored = 0
    for _ in range(60):
        outcome = {(a, c, b, s, i): rng.random() < 0.5 for a in ("Country", "Continent") for c in (True, False)
                   for i, (b, s) in enumerate(design[c])}  # fmt: skip
        counter = {}

        def drawn(attribute, cause, base, source, outcome=outcome, counter=counter):  # the i-th pair of its kind
            i = counter[(attribute, cause)] = counter.get((attribute, cause), -1) + 1
            return outcome[(attribute, cause, base, source, i)]

        calls, per_class = traced_ravel_run(design, drawn)
        if any(not 0 < call[s] < 1 for call in calls for s in ("cause_score", "isolation_score")):
            continue  # no deviation to speak of
        result = ravel_standard_errors(calls, per_class, config)
        for name, attributes in (("city.Country.cause_score", [0]), ("cause_score", [0, 1])):
            shares = []  # (entities, a_p)
            for index in attributes:
                call = calls[index]
                caused = [(b, s, o) for cause, b, s, o in call["pairs"] if cause]
                shares += [({b, s}, (o - call["cause_score"]) / len(caused) / len(attributes)) for b, s, o in caused]
            shared = sum(a * c for x, a in shares for y, c in shares if x & y)
            within = sum(a * c for x, a in shares for y, c in shares if x == y)
            assert result["se"][name] ** 2 == pytest.approx(max(shared, within), rel=1e-9, abs=1e-15), name
            if abs(shared - within) > 1e-12:  # (equal up to rounding: either side)
                assert (name in result["floored"]) == (shared < within), name
                floored += shared < within
    assert floored > 0  # the floor decided some


def test_ravel_online_reads_the_model_and_the_pinned_prompts_from_the_hub(fact_world, tmp_path):
    """The evaluate step's RAVEL as gemma-2-2b.yaml runs it online, end to end in its own process against a local Hub
    with the real clients: the model `google/gemma-2-2b` (here the fact world's tiny Gemma-2, which knows its cities)
    and RAVEL's prompts from `adamkarvonen/ravel_prompts` at the experiment's pinned commit, not the newer one, the
    run tagging it. With SAEBench's default selection, whose `nobel_prize_winner` class that commit does not hold, the
    suite fails naming it, before SAEBench could download the newest commit in its place."""
    import os
    import subprocess
    import sys

    import mlflow
    import yaml
    from conftest import ROOT
    from hub_server import HubServer, pointed_at
    from huggingface_hub import HfApi

    from saecomp.evaluate import RAVEL_PROMPTS_REPO

    token = "hf_ravelOnlineTestToken0123456789abcdef"
    for name, corpus in (("first", FACT_CORPUS), ("second", CorpusConfig(n_documents=100, n_cities=12))):
        write_ravel_files(corpus, tmp_path / name)
    sae = resid_sae(0)
    sae.cfg.metadata.model_name = "google/gemma-2-2b"
    sae.save_model(str(tmp_path / "sae"))
    with HubServer(token=token) as hub, pointed_at(hub, tmp_path / "hf_cache", token=token):
        api = HfApi()
        api.create_repo("google/gemma-2-2b")
        api.upload_folder(repo_id="google/gemma-2-2b", folder_path=str(fact_world / "tiny-gemma2"))
        api.create_repo(RAVEL_PROMPTS_REPO, repo_type="dataset")
        commits = [api.upload_folder(repo_id=RAVEL_PROMPTS_REPO, repo_type="dataset", folder_path=str(tmp_path / name / "base")).oid
                   for name in ("first", "second")]  # fmt: skip
        config = yaml.safe_load((ROOT / "experiments" / "gemma-2-2b.yaml").read_text())
        sae_section = {**config["sae"], "hooks": ["hook_resid_post"], "layers": [0]}
        config.update(name="online-ravel", device="cpu", dtype="float32", sae=sae_section)
        config["evaluation"] = {"suites": ["ravel"], "ravel_pairs_per_attribute": 100, "ravel_data_revision": commits[0],
                                "ravel_entity_attribute_selection": {"city": list(RAVEL_ATTRIBUTE_TEMPLATES)}}  # fmt: skip
        env = {
            **os.environ,  # pointed_at's: the local Hub's endpoint, online, the token, a fresh Hugging Face cache
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "SAECOMP_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": str(ROOT),
        }
        outs, requests = [], []
        for selection in ({"city": list(RAVEL_ATTRIBUTE_TEMPLATES)}, None):  # the experiment's, then SAEBench's default
            config["evaluation"]["ravel_entity_attribute_selection"] = selection
            (tmp_path / "online.yaml").write_text(yaml.safe_dump(config))
            command = [sys.executable, "-m", "entrypoints.evaluate", "--experiment", str(tmp_path / "online.yaml"),
                       "--sae", str(tmp_path / "sae"), "--model", "dense", "--variant", "pretrained"]  # fmt: skip
            asked = len(hub.requests)
            outs.append(subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900))
            requests.append(hub.requests[asked:])
    assert outs[0].returncode == 0, outs[0].stderr[-6000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("online-ravel").experiment_id], order_by=["attributes.start_time ASC"])
    finished, failed = [r for r in runs if r.data.tags.get("saecomp.step") == "evaluate"]
    assert finished.info.status == "FINISHED" and finished.data.tags["saecomp.ravel.data"] == f"{RAVEL_PROMPTS_REPO}@{commits[0]}"
    metrics = finished.data.metrics
    assert metrics["ravel.n_entities_kept"] >= 20 and metrics["ravel.n_prompts"] == 360  # the first commit's 30 cities
    assert 0.0 <= metrics["ravel.disentanglement_score"] <= 1.0
    assert any("/google/gemma-2-2b/resolve/" in r.path for r in requests[0])
    # SAEBench's default selection: refused on the pinned files, and nothing more downloaded
    assert outs[1].returncode != 0 and failed.info.status == "FAILED"
    reason = failed.data.tags["saecomp.ravel.failed"]
    assert "RAVEL's data has no entity class 'nobel_prize_winner'" in reason and "it has: city" in reason, reason
    # RAVEL's data only ever at the pinned commit (the second run finds it in the Hugging Face cache), never at main
    # as SAEBench's own download asks for it
    read = [[r.path for r in asked if RAVEL_PROMPTS_REPO in r.path] for asked in requests]
    assert read[0] and all(commits[0] in path for path in read[0] + read[1]), read
