"""SAEBench's labelled datasets, generated from the tiny world, under the Hub names SAEBench loads.

SAEBench's SCR, TPP and sparse probing call ``datasets.load_dataset("LabHC/bias_in_bios")`` and
``load_dataset("canrager/amazon_reviews_mcauley_1and5")`` with no way to pass data in. Offline, ``datasets`` reads
a dataset it has cached before under that name. So we write the tiny world's biographies and reviews, in the
columns and label ids of the real datasets, into a Hugging Face datasets cache under those names (with the same
builder ``datasets`` uses for a Hub dataset), and run SAEBench's unmodified code inside `offline_datasets`, the
one adapter: it points ``datasets`` at that cache and forbids the Hub for the duration.

- ``LabHC/bias_in_bios``: ``hard_text`` (a biography without its first sentence, the one naming the profession
  and city; a later sentence still names the profession), ``profession`` (SAEBench's id), ``gender`` (0 male,
  1 female). Professions follow gender with the world's ``profession_gender_correlation``: the spurious
  correlation SCR removes.
- ``canrager/amazon_reviews_mcauley_1and5``: ``text``, ``category`` (SAEBench's Amazon id), ``rating`` (1.0 or
  5.0). Sentiment is independent of category.

The world's professions and categories carry SAEBench's names (saecomp.world.text), so SAEBench's own class sets
and SCR pairs apply unchanged. There is no tiny-world counterpart of github-code, ag_news or europarl.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIAS_IN_BIOS = "LabHC/bias_in_bios"
AMAZON = "canrager/amazon_reviews_mcauley_1and5"
TINY_SPARSE_PROBING_DATASETS = [
    "LabHC/bias_in_bios_class_set1",
    "LabHC/bias_in_bios_class_set2",
    "LabHC/bias_in_bios_class_set3",
    AMAZON,
    f"{AMAZON}_sentiment",
]
"""SAEBench's sparse-probing datasets that the tiny world has: five of its eight."""
TINY_SCR_TPP_DATASETS = ["LabHC/bias_in_bios_class_set1", AMAZON]
"""SAEBench's SCR/TPP datasets (its defaults); the tiny world has both."""
SAEBENCH_SPARSE_PROBING_DATASETS = [
    *TINY_SPARSE_PROBING_DATASETS,
    "codeparrot/github-code",
    "fancyzhx/ag_news",
    "Helsinki-NLP/europarl",
]
"""SAEBench's eight sparse-probing datasets (its default)."""
GENDER_IDS = {"male": 0, "female": 1}


def hub_repo_of(dataset: str) -> str:
    """The Hub dataset SAEBench's loaders read for one of its dataset names: its bias_in_bios class sets and Amazon
    sentiment task are views of one repository each (`dataset_utils`, `dataset_creation`)."""
    return dataset.split("_class_set")[0].split("_sentiment")[0]


LABELLED_DATA_REPOS = sorted({hub_repo_of(name) for name in SAEBENCH_SPARSE_PROBING_DATASETS + TINY_SCR_TPP_DATASETS})
"""The Hub datasets SAEBench's probing suites read online (``evaluation.labelled_data_revisions`` pins them)."""


def check_labelled_data_revisions(revisions: dict[str, str]) -> None:
    """A ValueError naming the first repository the probing suites never read, or an empty revision."""
    for repo, revision in revisions.items():
        if repo not in LABELLED_DATA_REPOS:
            raise ValueError(f"labelled_data_revisions names {repo!r}; valid: {', '.join(LABELLED_DATA_REPOS)}")
        if not isinstance(revision, str) or not revision.strip():
            raise ValueError(f"labelled_data_revisions[{repo!r}]={revision!r}; valid: a branch, tag or commit")


@contextmanager
def pinned_labelled_data(revisions: dict[str, str], repos: list[str] = ()) -> Iterator[dict[str, str]]:
    """Online, SAEBench's probing suites load each labelled Hub dataset with ``load_dataset(<repo>)``: whatever its
    newest commit is that day. Inside, each such load gets ``revision=<commit>`` instead: the experiment's revision
    for that repository (``evaluation.labelled_data_revisions``: branch, tag or commit; "main" where it names none),
    resolved to a commit on entry for ``repos`` (those the suites will read; any other at its first load). Yields
    ``{repo: commit}`` (the run tags it, ``saecomp.labelled_data``, and it keys the shared model side), so every number
    names exactly the data it comes from, also where SAEBench loads saved activations and never calls the loader.

    SAEBench's loaders take no revision, so for the duration the ``load_dataset`` its two loader modules imported is
    wrapped (`sae_bench_utils.dataset_utils`, `scr_and_tpp.dataset_creation`): module attributes, so one evaluation
    per process at a time (the evaluate step's). A load that passes its own revision is left as it is. Offline
    (``datasets``' or the Hub client's offline mode) nothing is resolved and no revision is passed: ``datasets`` then
    reads its cache's newest copy whatever the revision, and the yielded value says that it was not verified."""
    import importlib

    import datasets.config
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hub_constants

    offline = bool(datasets.config.HF_HUB_OFFLINE or hub_constants.HF_HUB_OFFLINE)
    resolved: dict[str, str] = {}

    def resolve(repo: str) -> None:
        revision = revisions.get(repo, "main")
        if offline:
            resolved[repo] = f"{revision} asked; offline, the datasets cache's newest copy (not verified)"
        else:
            resolved[repo] = HfApi().dataset_info(repo, revision=revision).sha

    for repo in repos:
        resolve(repo)
    loaders = ("sae_bench.sae_bench_utils.dataset_utils", "sae_bench.evals.scr_and_tpp.dataset_creation")
    modules = [importlib.import_module(name) for name in loaders]
    originals = [module.load_dataset for module in modules]

    def wrapped(original):
        def load(path, *args, **kwargs):
            if "revision" in kwargs or path not in LABELLED_DATA_REPOS:
                return original(path, *args, **kwargs)
            if path not in resolved:
                resolve(path)
            if re.fullmatch(r"[0-9a-f]{40}", resolved[path]):
                kwargs["revision"] = resolved[path]
            return original(path, *args, **kwargs)

        return load

    try:
        for module, original in zip(modules, originals, strict=True):
            module.load_dataset = wrapped(original)
        yield resolved
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.load_dataset = original


def default_datasets(field: str, tiny: bool) -> list[str]:
    """The datasets a suite reads when the experiment names none (``field``: sparse_probing_datasets or
    scr_tpp_datasets): SAEBench's defaults, restricted to what the tiny world has for a tiny model."""
    if field == "sparse_probing_datasets":
        return list(TINY_SPARSE_PROBING_DATASETS if tiny else SAEBENCH_SPARSE_PROBING_DATASETS)
    return list(TINY_SCR_TPP_DATASETS)


def check_datasets(field: str, names: list[str] | None, tiny: bool) -> None:
    """A ValueError naming the first dataset that the suite cannot read (for a tiny model: that the world lacks)."""
    if names is None:
        return
    if not names:
        raise ValueError(f"{field}=[] is not valid; valid: one or more of {', '.join(default_datasets(field, tiny))}")
    valid = (
        default_datasets(field, tiny)
        if tiny
        else (SAEBENCH_SPARSE_PROBING_DATASETS if field == "sparse_probing_datasets" else TINY_SCR_TPP_DATASETS)
    )
    for name in names:
        if name not in valid:
            where = "the tiny world has" if tiny else "SAEBench offers"
            raise ValueError(f"{field} contains {name!r}; valid ({where}): {', '.join(valid)}")


RATINGS = {"negative": 1.0, "positive": 5.0}


def rows_needed(per_quadrant: int, share: float) -> int:
    """Rows to draw so that the rarest (class, label) quadrant, a ``share`` of all rows, holds ``per_quadrant``
    examples with room to spare (4 sigma of the binomial draw)."""
    mean_needed = per_quadrant / share
    return int(math.ceil(mean_needed + 4 * math.sqrt(mean_needed / share) + 20))


def bios_share(correlation: float, n_professions_per_gender: int = 8) -> float:
    """Fraction of biographies in the rarest (profession, gender) quadrant."""
    return 0.5 * min(correlation, 1 - correlation) / n_professions_per_gender


def bias_in_bios_rows(corpus_cfg, n: int, split: str) -> dict[str, list]:
    """``n`` biographies in bias_in_bios's columns, drawn from the world with their own stream per split."""
    from sae_bench.sae_bench_utils.dataset_info import profession_dict

    from saecomp.world.text import generate_records_of_kind

    rows: dict[str, list] = {"hard_text": [], "profession": [], "gender": []}
    for record in generate_records_of_kind(corpus_cfg, "bio", n, stream=f"saebench-{split}"):
        first, rest = record["text"].split(". ", 1)  # the first sentence names profession and city
        rows["hard_text"].append(rest)
        rows["profession"].append(profession_dict[record["labels"]["profession"]])
        rows["gender"].append(GENDER_IDS[record["labels"]["gender"]])
    return rows


def amazon_rows(corpus_cfg, n: int, split: str) -> dict[str, list]:
    """``n`` reviews in the Amazon 1-and-5-star dataset's columns."""
    from sae_bench.sae_bench_utils.dataset_info import amazon_category_dict

    from saecomp.world.text import generate_records_of_kind

    rows: dict[str, list] = {"text": [], "category": [], "rating": []}
    for record in generate_records_of_kind(corpus_cfg, "review", n, stream=f"saebench-{split}"):
        rows["text"].append(record["text"])
        rows["category"].append(amazon_category_dict[record["labels"]["category"]])
        rows["rating"].append(RATINGS[record["labels"]["sentiment"]])
    return rows


def write_offline_datasets(corpus_cfg, out_dir: str | Path, train_per_quadrant: int, test_per_quadrant: int) -> dict:
    """Parquet files ``out_dir/parquet/<dataset>/{train,test}.parquet`` and a datasets cache ``out_dir/hf_datasets``
    that ``load_dataset(<Hub name>)`` reads offline. Returns the row counts. Deterministic in the world's config.

    ``*_per_quadrant``: the most examples SAEBench will ask for in one (class, label) quadrant: a quarter of the
    largest train (test) set size of the suites that read these datasets."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.load import configure_builder_class
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    correlation = corpus_cfg.profession_gender_correlation
    if bios_share(correlation) == 0:
        raise ValueError(
            f"world.corpus.profession_gender_correlation={correlation} leaves a gender without biographies of some "
            "professions; SCR, TPP and sparse probing need both genders in every profession: use a value in (0, 1)"
        )
    out_dir = Path(out_dir)
    counts = {}
    makers = {
        BIAS_IN_BIOS: (bias_in_bios_rows, bios_share(correlation)),
        AMAZON: (amazon_rows, 0.5 / 10),  # 10 categories x 2 ratings, independent
    }
    for name, (make_rows, share) in makers.items():
        folder = out_dir / "parquet" / name.replace("/", "__")
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for split, per_quadrant in (("train", train_per_quadrant), ("test", test_per_quadrant)):
            # SCR asks for more than twice a quadrant from the two quadrants its biased sets are built from.
            rows = make_rows(corpus_cfg, rows_needed(2 * per_quadrant + 1, share), split)
            pq.write_table(pa.table(rows), folder / f"{split}.parquet")
            files[split] = [str((folder / f"{split}.parquet").resolve())]
            counts[f"{name}/{split}"] = len(next(iter(rows.values())))
        # The builder `datasets` itself uses for a Hub dataset of parquet files, so the cache has the Hub layout
        # (<namespace>___<name>/default/0.0.0/<hash>) that offline `load_dataset(name)` looks up.
        config = ParquetConfig(name="default", data_files=DataFilesDict.from_patterns(files))
        builder_class = configure_builder_class(
            Parquet, builder_configs=[config], default_config_name="default", dataset_name=name.split("/")[1]
        )
        builder = builder_class(
            cache_dir=str(out_dir / "hf_datasets"), dataset_name=name.split("/")[1], repo_id=name, hash="saecomp-tiny-world"
        )
        builder.download_and_prepare()
    return counts


@contextmanager
def offline_datasets(cache_dir: str | Path) -> Iterator[None]:
    """Inside: ``datasets`` reads only ``cache_dir`` and never the Hub, so SAEBench's ``load_dataset(<Hub name>)``
    gets the tiny world's data even on a machine that could reach the Hub. The one adapter we need: SAEBench's
    loaders take no path or cache argument, and ``datasets`` reads these settings at call time."""
    import datasets.config

    saved = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE)
    datasets.config.HF_DATASETS_CACHE = Path(cache_dir)
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE = saved


# --- RAVEL ------------------------------------------------------------------------------------------
# SAEBench's RAVEL reads four JSON files per entity class from ``<artifact_dir>/base`` and downloads
# `adamkarvonen/ravel_prompts` only when they are missing: its own way in, so we write them there.

RAVEL_ENTITY = "city"
RAVEL_ATTRIBUTE_TEMPLATES = {
    "Country": "%s is a city in",
    "Continent": "%s lies in",
    "Language": "The people of %s speak",
}
"""RAVEL's city attributes (SAEBench's names) and the world's own phrasing of each fact, the city as ``%s``."""
TINY_RAVEL_SELECTION = {RAVEL_ENTITY: list(RAVEL_ATTRIBUTE_TEMPLATES)}
"""SAEBench's ``entity_attribute_selection`` for the tiny world: its city class (it has no Nobel laureates)."""


def check_ravel_selection(selection: dict[str, list[str]] | None, tiny: bool) -> None:
    """A ValueError naming the first entity class of ``selection`` (``evaluation.ravel_entity_attribute_selection``)
    with fewer than two distinct attribute classes, or, for a tiny model, one the world does not have. Which classes a
    Hub revision holds is checked once its files are fetched (`check_ravel_files`)."""
    if selection is None:
        return
    field = "ravel_entity_attribute_selection"
    if not selection:
        raise ValueError(f"{field}={{}} selects nothing; valid: entity classes, each with two or more attribute classes")
    for entity, attributes in selection.items():
        if len(set(attributes)) < 2:
            raise ValueError(f"{field}[{entity!r}]={attributes!r}; valid: two or more distinct attribute classes")
        if tiny:
            have = TINY_RAVEL_SELECTION.get(entity)
            if have is None:
                raise ValueError(f"{field} names {entity!r}, which the tiny world has no facts of; valid: {RAVEL_ENTITY}")
            unknown = [a for a in attributes if a not in have]
            if unknown:
                raise ValueError(f"{field}[{entity!r}] names {unknown[0]!r}; valid: {', '.join(have)}")


def check_ravel_files(folder: str | Path, selection: dict[str, list[str]]) -> None:
    """A ValueError unless ``<folder>/base`` holds SAEBench's four RAVEL files of every entity class in ``selection``,
    with every attribute class it names. Checked before RAVEL runs: for a class whose files are missing SAEBench would
    download the dataset's newest commit over the pinned one."""
    import json

    base = Path(folder) / "base"
    suffix = "_entity_attributes.json"
    have = sorted(p.name.removeprefix("ravel_").removesuffix(suffix) for p in base.glob(f"ravel_*{suffix}"))
    for entity, attributes in selection.items():
        names = ("attribute_to_prompts", "prompt_to_split", "entity_attributes", "entity_to_split")  # SAEBench's load_files
        files = [base / f"ravel_{entity}_{name}.json" for name in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"RAVEL's data has no entity class {entity!r} ({missing[0]} is missing); it has: {', '.join(have) or 'none'}")
        prompts = json.loads(files[0].read_text())
        unknown = [a for a in attributes if a not in prompts]
        if unknown:
            raise ValueError(f"RAVEL's data has no attribute {unknown[0]!r} of {entity!r}; it has: {', '.join(sorted(prompts))}")


def ravel_templates(corpus_cfg, n_contexts: int = 3) -> dict[str, list[str]]:
    """Per attribute, its template bare and after ``n_contexts`` context sentences from the world's stories (RAVEL
    asks for each fact in several contexts)."""
    from saecomp.world.text import generate_records_of_kind

    stories = generate_records_of_kind(corpus_cfg, "story", n_contexts, "ravel-contexts")
    contexts = [""] + [story["text"].split(". ")[0] + ".\n\n" for story in stories]
    return {attribute: [context + template for context in contexts] for attribute, template in RAVEL_ATTRIBUTE_TEMPLATES.items()}


def write_ravel_files(corpus_cfg, artifact_dir: str | Path, n_contexts: int = 3) -> dict[str, int]:
    """SAEBench's RAVEL files for the world's cities into ``<artifact_dir>/base``: entity -> attributes, attribute
    -> templates, and the train/val splits of entities and templates (alternating, deterministic)."""
    import json

    from saecomp.world.text import build_world

    world = build_world(corpus_cfg)
    attributes = {}
    for city, country in sorted(world.cities.items()):
        continent, language = world.countries[country]
        attributes[city] = {"Country": country, "Continent": continent, "Language": language}
    templates = ravel_templates(corpus_cfg, n_contexts)
    files = {
        "entity_attributes": attributes,
        "attribute_to_prompts": templates,
        "entity_to_split": {city: ("train" if i % 2 == 0 else "val") for i, city in enumerate(attributes)},
        "prompt_to_split": {t: ("train" if i % 2 == 0 else "val") for ts in templates.values() for i, t in enumerate(ts)},
    }
    base = Path(artifact_dir) / "base"
    base.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (base / f"ravel_{RAVEL_ENTITY}_{name}.json").write_text(json.dumps(content, indent=1, sort_keys=True))
    return {"entities": len(attributes), "prompts": len(attributes) * sum(len(ts) for ts in templates.values())}
