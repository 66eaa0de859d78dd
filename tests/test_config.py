"""The experiment schema: pydantic models with one-line errors, and the JSON Schema editors read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from saecomp.config import ConfigError, Experiment, json_schema, load_experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"


def test_published_schema_is_current():
    """`experiments/schema.json` is what the code validates against (regenerate: python -m saecomp.config --schema)."""
    published = json.loads((ROOT / "experiments" / "schema.json").read_text())
    assert published == json.loads(json.dumps(json_schema()))
    sparsity = published["$defs"]["LLMPruningConfig"]["properties"]["sparsity"]
    assert "Fraction of weights zeroed" in sparsity["description"]  # the field docstrings reach the editor
    assert published["additionalProperties"] is False  # a typo is flagged in the editor too


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_names_the_schema_and_loads(path):
    assert path.read_text().startswith("# yaml-language-server: $schema=./schema.json")
    exp = load_experiment(path)
    assert set(yaml.safe_load(path.read_text())) <= set(Experiment.model_fields)
    assert exp.runtime() == {"device": exp.device, "dtype": exp.dtype}


def test_the_real_experiments_declare_their_device_and_dtype():
    assert load_experiment(ROOT / "experiments" / "gemma-2-2b.yaml").runtime() == {"device": "cuda", "dtype": "bfloat16"}
    assert load_experiment(TINY).runtime() == {"device": "cpu", "dtype": "float32"}


ERRORS = [
    ({"llm_pruning.sparsity": "abc"}, "llm_pruning.sparsity='abc' is not a number"),
    ({"sae.expansion_fator": 4}, "unknown key sae.expansion_fator; valid keys: hooks, layers, architecture"),
    ({"nonsense": 1}, "unknown key nonsense; valid keys: name, model, device, dtype"),
    ({"calibration.n_sequences": "1.5"}, "calibration.n_sequences='1.5' is not an integer"),
    ({"sae_pruning.tolerance": "nan"}, "sae_pruning.tolerance='nan' is not a finite number"),
    ({"sae": 5}, "sae must be a mapping, got 5"),
    ({"sae.layers": [1, "x"]}, "sae.layers[1]='x' is not an integer"),
    ({"sae.layers": "first"}, "sae.layers='first' is not valid; valid: a list of layers or 'all'"),
    ({"dtype": "int8"}, "dtype='int8' is not valid; valid: float32, bfloat16, float16"),
    ({"device": "cuda:x"}, "device='cuda:x' is not valid"),
    ({"sae.pretrained": {"hook_mlp_out": [1]}}, "sae.pretrained.hook_mlp_out"),
    ({"sae_pruning.tolerance": True}, "sae_pruning.tolerance=True is not a number"),
    ({"calibration.seed": True}, "calibration.seed=True is not an integer"),
    ({"held_out.n_sequences": 64.0}, "held_out.n_sequences=64.0 is not an integer"),
    ({"held_out.n_sequences": "1.0"}, "held_out.n_sequences='1.0' is not an integer"),
    ({"llm_pruning.layers": [True, 1]}, "llm_pruning.layers=[True, 1] is not an integer"),
    ({"llm_pruning.layers": []}, "llm_pruning.layers=[] prunes no block; valid: the blocks to prune, or null (the default)"),
    ({"sae_pruning.sparsities": [False]}, "sae_pruning.sparsities=[False] is not a number"),
    (
        {"evaluation.suites": ["core", "autointerp"]},
        "suite='autointerp' is not valid; valid: core, absorption, scr, tpp, sparse_probing, ravel",
    ),
    (
        {"evaluation.sparse_probing_datasets": ["fancyzhx/ag_news"]},
        "evaluation.sparse_probing_datasets contains 'fancyzhx/ag_news'; valid (the tiny world has)",
    ),
    ({"evaluation.scr_tpp_n_values": [0, 5]}, "scr_tpp_n_values=[0, 5] is not valid; valid: a list drawn from 2, 5, 10, 20, 50, 100, 500"),
    ({"evaluation.scr_tpp_train_size": 4}, "evaluation.scr_tpp_train_size=4 is too small"),
    ({"evaluation.absorption_min_letters": 1}, "evaluation.absorption_min_letters=1 is not valid; valid: 2 to 26 letters"),
    (
        {"evaluation.labelled_data_revisions": {"LabHC/bios": "main"}},
        "evaluation.labelled_data_revisions names 'LabHC/bios'; valid: Helsinki-NLP/europarl, LabHC/bias_in_bios",
    ),
    ({"evaluation.labelled_data_revisions": {"fancyzhx/ag_news": " "}}, "labelled_data_revisions['fancyzhx/ag_news']=' '; valid: a branch"),
    (
        {"evaluation.ravel_entity_attribute_selection": {"city": ["Country"]}},
        "evaluation.ravel_entity_attribute_selection['city']=['Country']; valid: two or more distinct attribute classes",
    ),
    (
        {"evaluation.ravel_entity_attribute_selection": {"nobel_prize_winner": ["Field", "Gender"]}},
        "evaluation.ravel_entity_attribute_selection names 'nobel_prize_winner', which the tiny world has no facts of; valid: city",
    ),
    (
        {"evaluation.ravel_entity_attribute_selection": {"city": ["Country", "Population"]}},
        "evaluation.ravel_entity_attribute_selection['city'] names 'Population'; valid: Country, Continent, Language",
    ),
    (
        {"world.corpus.profession_gender_correlation": 1.0, "evaluation.suites": ["scr"]},
        "world.corpus.profession_gender_correlation=1.0 leaves a gender without biographies",
    ),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[m for _, m in ERRORS])
def test_errors_are_one_line_naming_field_and_value(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_experiment(TINY, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_values_a_person_writes_by_hand_are_understood():
    exp = load_experiment(TINY, {"sae.layers": 3, "sae.hooks": "hook_mlp_out", "sae_pruning.sparsities": 0.5})
    assert exp.sae.layers == [3] and exp.sae.hooks == ["hook_mlp_out"] and exp.sae_pruning.sparsities == [0.5]
    assert load_experiment(TINY, {"sae.layers": "1,2"}).sae.layers == [1, 2]
    assert load_experiment(TINY, {"sae.layers": "all"}).sae.layers == "all"
    assert load_experiment(TINY, {"llm_pruning.sparsity": "0.25"}).llm_pruning.sparsity == 0.25


def test_device_and_dtype_are_part_of_every_step_key(small_experiment):
    from entrypoints import prune_llm

    exp = load_experiment(small_experiment)
    other = load_experiment(small_experiment, {"dtype": "bfloat16"})
    assert prune_llm.key_for(exp, str(small_experiment)) != prune_llm.key_for(other, str(small_experiment))


def test_an_emptied_section_means_its_defaults(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["sae_pruning"] = None  # what `sae_pruning:` with every line below it commented out reads as
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_experiment(path).sae_pruning.tolerance == 0.05


def test_the_schema_accepts_what_the_loader_accepts():
    properties = json_schema()["$defs"]["SAEConfig"]["properties"]
    assert {"type": "string"} in properties["hooks"]["anyOf"]  # `hooks: hook_mlp_out`
    assert {"type": "integer"} in properties["layers"]["anyOf"] and {"const": "all"} in properties["layers"]["anyOf"]
    assert json_schema()["properties"]["dtype"]["enum"] == ["float32", "bfloat16", "float16"]


def test_models_compute_on_the_asked_device_even_where_a_gpu_exists(small_world, monkeypatch):
    """TransformerLens defaults `cfg.device` to cuda wherever a GPU exists; `device: cpu` must still mean the CPU."""
    import torch

    from saecomp.models import load_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loaded = load_model("tiny-gpt2", small_world / "tiny-gpt2", "float32", device="cpu")
    assert str(loaded.tl.cfg.device) == "cpu" and next(loaded.tl.parameters()).device.type == "cpu"


def test_the_torch_free_names_agree_with_the_libraries_they_stand_for():
    """saecomp/names.py keeps what validation needs without importing torch; these are the places it could drift."""
    from saecomp import names, train_sae
    from saecomp.world.build import WorldConfig, hf_config

    assert names.SAE_ARCHITECTURES == tuple(train_sae.ARCHITECTURES)  # an experiment may name what SAELens trains
    world = WorldConfig()
    for name, model in world.models.items():
        shape = names.ModelDims.from_hf_config(hf_config(model, world.vocab_size, 0))
        assert names.ModelDims.from_tiny(model) == shape, name
        assert shape.architecture == names.TINY_MODELS[name]
