"""The tiny world: deterministic text with planted, labelled structure; models that learn it."""

from __future__ import annotations

import json
import string

import torch

from saecomp.world.build import (
    TinyModelConfig,
    WorldConfig,
    mean_loss,
    token_stream,
    train_model,
    train_tokenizer,
    unigram_entropy,
)
from saecomp.world.text import (
    PROFESSIONS_FEMALE_TYPICAL,
    PROFESSIONS_MALE_TYPICAL,
    CorpusConfig,
    build_world,
    generate_documents,
    generate_records,
)


def test_same_config_same_corpus_other_seed_other_corpus():
    cfg = CorpusConfig(n_documents=50)
    assert generate_documents(cfg) == generate_documents(CorpusConfig(n_documents=50))
    assert generate_documents(cfg) != generate_documents(CorpusConfig(n_documents=50, seed=1))


def test_words_start_with_every_letter():
    text = " ".join(generate_documents(CorpusConfig(n_documents=400)))
    initials = {w[0].lower() for w in text.split() if w[0].isalpha()}
    assert set(string.ascii_lowercase) <= initials


def test_city_facts_are_consistent_with_the_world():
    cfg = CorpusConfig(n_documents=50)
    world = build_world(cfg)
    cities = [r for r in generate_records(cfg, 500) if r["kind"] == "city"]
    assert len(cities) > 50
    for record in cities:
        labels = record["labels"]
        assert world.cities[labels["city"]] == labels["country"]
        assert world.countries[labels["country"]] == (labels["continent"], labels["language"])
        assert f"{labels['city']} is a city in {labels['country']}." in record["text"]


def test_profession_gender_correlation_is_a_knob():
    def typical_fraction(correlation):
        cfg = CorpusConfig(n_documents=50, profession_gender_correlation=correlation)
        bios = [r["labels"] for r in generate_records(cfg, 3000) if r["kind"] == "bio"]
        typical = [(b["profession"] in PROFESSIONS_FEMALE_TYPICAL) == (b["gender"] == "female") for b in bios]
        return sum(typical) / len(typical)

    assert abs(typical_fraction(0.9) - 0.9) < 0.04
    assert abs(typical_fraction(0.5) - 0.5) < 0.05
    assert set(PROFESSIONS_FEMALE_TYPICAL).isdisjoint(PROFESSIONS_MALE_TYPICAL)


def test_reviews_carry_their_sentiment():
    cfg = CorpusConfig(n_documents=50)
    for record in generate_records(cfg, 300):
        if record["kind"] == "review":
            positive = "buy it again" in record["text"]
            assert positive == (record["labels"]["sentiment"] == "positive")


def test_world_config_roundtrips_through_dict():
    cfg = WorldConfig(corpus=CorpusConfig(n_documents=20, records_per_document=(2, 3)))
    again = WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_a_tiny_model_learns_far_below_the_unigram_entropy():
    cfg = CorpusConfig(n_documents=400)
    documents = generate_documents(cfg)
    tokenizer = train_tokenizer(documents[:360], 512)
    train_ids, heldout_ids = token_stream(documents[:360], tokenizer), token_stream(documents[360:], tokenizer)
    entropy = unigram_entropy(train_ids, heldout_ids)
    model_cfg = TinyModelConfig("gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=128, n_ctx=64, train_steps=150, batch_size=16)
    curve = []
    model = train_model(model_cfg, tokenizer, train_ids, heldout_ids, on_step=lambda step, m: curve.append(m["train_loss"]))
    loss = mean_loss(model, heldout_ids, 64)
    assert loss < entropy - 1.0, (loss, entropy)
    assert curve[-1] < curve[0] - 2.0
    assert torch.isfinite(torch.tensor(curve)).all()


def test_built_world_loads_with_the_usual_tools(small_world):
    import datasets
    from transformers import AutoTokenizer

    corpus = datasets.load_from_disk(str(small_world / "corpus"))
    assert set(corpus) == {"train", "validation", "test"}
    assert not set(corpus["train"]["text"]) & set(corpus["test"]["text"])
    records = datasets.load_from_disk(str(small_world / "records"))
    assert {"bio", "review", "city", "story"} == set(records["kind"])
    tokenizer = AutoTokenizer.from_pretrained(small_world / "tokenizer")
    assert tokenizer.decode(tokenizer("Once upon a time")["input_ids"]) == "Once upon a time"


def test_a_model_built_alone_is_the_one_built_beside_the_others(small_experiment, small_world, tmp_path):
    """The pipeline builds only the experiment's model (entrypoints.common.world_needed): that must not change it.
    tiny-gemma2 is built second in the shared world, after tiny-gpt2's training has used the random streams."""
    from entrypoints.common import load, world_needed
    from saecomp.world.build import build_world as build_tiny_world

    exp = load(str(small_experiment), {"model": "tiny-gemma2"})
    needed = world_needed(exp)
    assert list(needed.models) == ["tiny-gemma2"] and list(exp.world_config().models) == ["tiny-gpt2", "tiny-gemma2"]
    alone = tmp_path / "alone"
    summary = build_tiny_world(needed, alone, log=lambda line: None)
    assert list(summary["models"]) == ["tiny-gemma2"] and not (alone / "tiny-gpt2").exists()
    for name in ("tiny-gemma2/model.safetensors", "tiny-gemma2/tokenizer.json", "tokenizer/tokenizer.json"):
        assert (alone / name).read_bytes() == (small_world / name).read_bytes(), name
    shared = json.loads((small_world / "world.json").read_text())
    assert summary["models"]["tiny-gemma2"]["test_loss"] == shared["models"]["tiny-gemma2"]["test_loss"]
    try:
        exp.world_config().only("tiny-llama")
    except ValueError as error:
        assert "tiny-llama" in str(error) and "tiny-gpt2, tiny-gemma2" in str(error)
    else:
        raise AssertionError("an unknown model was accepted")
