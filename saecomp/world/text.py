"""A seeded generator of English-like text with planted, labelled structure.

The tiny world stands in for OpenWebText / the Pile when the Hub cannot be reached. Every paragraph
is one *record* of a known kind with known labels, so that later evaluations have ground truth:

- ``bio``: a short biography -- name, gender, profession, home city. Professions are drawn from a
  gender-typical set with probability ``profession_gender_correlation`` (the spurious correlation
  that SAEBench's SCR removes).
- ``review``: a product review -- category and sentiment.
- ``city``: facts about a city -- country, continent, language (RAVEL-style entity attributes).
- ``story``: plain narrative text over a general lexicon.

Documents are runs of records, so a calibration window sees several kinds at once. Everything is a
pure function of the config: the same config gives the same corpus, byte for byte.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

# A general English lexicon, chosen so that every letter a-z starts many words (SAEBench's
# absorption task probes first letters).
NOUNS = (
    "apple acorn anchor arrow attic badger basket beach bell bridge candle castle cloud coin "
    "garden desk dragon drum eagle engine envelope falcon feather fence forest fountain garage "
    "giant glove harbor hammer helmet hill island igloo iron ivy jacket jar jelly jungle kettle "
    "kitten knight kite ladder lamp lantern lemon meadow mirror mountain mushroom needle nest "
    "notebook ocean onion orchard owl paddle parrot pencil pillow quarry queen quilt quiver "
    "rabbit river robot rocket saddle sailor shadow spoon table tiger tower tunnel umbrella "
    "uncle unicorn valley vase violin village wagon whistle window wizard xylophone yacht yard "
    "yarn yogurt zebra zipper zoo"
).split()
VERBS = (
    "admired built carried chased discovered dropped earned explored fixed followed gathered "
    "guarded held hid ignored imagined joined juggled kept kicked lifted lost mended moved "
    "noticed named opened ordered painted pulled questioned quieted raced repaired saved "
    "searched tossed traded uncovered unlocked visited viewed washed watched x-rayed yanked "
    "yelled zipped zoomed"
).split()
ADJECTIVES = (
    "ancient angry bright brave calm clever dusty eager empty faint fancy gentle golden happy "
    "hollow icy idle jolly jagged kind keen lazy little merry muddy narrow noisy odd orange "
    "polite proud quick quiet rapid rusty shiny silent tall tiny ugly usual vast velvet warm "
    "wild xenial young yellow zany zealous"
).split()
PLACES_IN_STORY = "kitchen market station library cellar garden harbor meadow bakery workshop".split()

# Professions and review categories carry the names of SAEBench's bias_in_bios professions and Amazon categories,
# so that its default class sets and SCR pairs (professor/nurse, architect/journalist, surgeon/psychologist,
# attorney/teacher; Books/CDs_and_Vinyl, ...) select tiny-world data by the same names (saecomp.saebench_data).
PROFESSIONS_FEMALE_TYPICAL = "nurse teacher journalist psychologist painter photographer poet dietitian".split()
PROFESSIONS_MALE_TYPICAL = "professor architect surgeon attorney accountant dentist filmmaker physician".split()
CONTINENTS = ("Africa", "Asia", "Europe", "Oceania", "Northland", "Southland")
REVIEW_CATEGORIES = {
    "Books": "novel atlas cookbook diary memoir biography".split(),
    "CDs_and_Vinyl": "album record single soundtrack vinyl compilation".split(),
    "Software": "app editor antivirus compiler spreadsheet browser".split(),
    "Electronics": "television camera speaker headphones monitor charger".split(),
    "Pet_Supplies": "leash collar litter aquarium birdcage kibble".split(),
    "Office_Products": "stapler binder folder printer envelope calculator".split(),
    "Industrial_and_Scientific": "microscope caliper beaker multimeter respirator thermometer".split(),
    "Toys_and_Games": "puzzle yoyo doll kite marble rattle".split(),
    "Cell_Phones_and_Accessories": "smartphone earbuds phonecase stylus powerbank holster".split(),
    "Musical_Instruments": "guitar ukulele flute banjo drum harmonica".split(),
}
# What each profession does and each product is used for: professions and categories appear in contexts of their
# own, so a model trained on the world learns to tell them apart (without them, every profession word would fill
# the same slots and look alike to it).
PROFESSION_WORK = {
    "nurse": ("hospital ward", "cares for patients"),
    "teacher": ("school", "grades essays"),
    "journalist": ("newsroom", "writes stories"),
    "psychologist": ("clinic", "listens to clients"),
    "painter": ("studio", "mixes colours"),
    "photographer": ("darkroom", "takes portraits"),
    "poet": ("library", "writes verses"),
    "dietitian": ("clinic", "plans meals"),
    "professor": ("university", "gives lectures"),
    "architect": ("office", "draws buildings"),
    "surgeon": ("operating theatre", "operates on patients"),
    "attorney": ("courthouse", "argues cases"),
    "accountant": ("bank", "checks ledgers"),
    "dentist": ("surgery", "fills teeth"),
    "filmmaker": ("film set", "shoots scenes"),
    "physician": ("hospital", "treats the sick"),
}
CATEGORY_USE = {
    "Books": "to read before bed",
    "CDs_and_Vinyl": "to listen to music at home",
    "Software": "on my computer at work",
    "Electronics": "to watch and listen in the living room",
    "Pet_Supplies": "for my dog and cat",
    "Office_Products": "at my desk for paperwork",
    "Industrial_and_Scientific": "in the laboratory",
    "Toys_and_Games": "to play with the children",
    "Cell_Phones_and_Accessories": "with my phone every day",
    "Musical_Instruments": "to practise songs with my band",
}
POSITIVE = "wonderful excellent sturdy lovely reliable superb delightful handy".split()
NEGATIVE = "awful flimsy broken useless terrible noisy disappointing leaky".split()

_SYLLABLES = (
    "ba be bi bo bu da de di do du fa fe fi fo ga ge go ha he hi ja jo ka ke ki ko la le li lo "
    "lu ma me mi mo mu na ne ni no nu pa pe pi po ra re ri ro ru sa se si so ta te ti to tu va "
    "ve vi vo wa we wi xa xo ya yo yu za ze zo qua qui ul ol an en in on ar er ir or"
).split()


@dataclass(frozen=True)
class CorpusConfig:
    """What the tiny world's text looks like. Every field changes the corpus."""

    seed: int = 0
    """Seed of both the world (which city lies where) and the sampled text."""
    n_documents: int = 3000
    """Number of documents; each is a run of records of mixed kinds."""
    records_per_document: tuple[int, int] = (4, 9)
    """Inclusive range of records per document."""
    profession_gender_correlation: float = 0.8
    """Probability that a biography's profession comes from its gender's typical set."""
    n_first_names: int = 300
    """First names per gender."""
    n_surnames: int = 1200
    n_countries: int = 24
    n_cities: int = 160
    n_brands: int = 400
    kind_weights: tuple[float, float, float, float] = (0.3, 0.25, 0.2, 0.25)
    """Sampling weights of (bio, review, city, story) records."""

    def __post_init__(self):
        if not 0.0 <= self.profession_gender_correlation <= 1.0:
            raise ValueError(f"profession_gender_correlation={self.profession_gender_correlation} must lie in [0, 1]")
        low, high = self.records_per_document
        if not 1 <= low <= high:
            raise ValueError(f"records_per_document={self.records_per_document} needs 1 <= low <= high")
        if self.n_documents < 10:
            raise ValueError(f"n_documents={self.n_documents} must be at least 10")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class World:
    """The fixed facts that the text talks about."""

    female_names: tuple[str, ...]
    male_names: tuple[str, ...]
    surnames: tuple[str, ...]
    brands: tuple[str, ...]
    # country -> (continent, language)
    countries: dict[str, tuple[str, str]]
    # city -> country
    cities: dict[str, str]


def _pseudo_words(rng: random.Random, n: int, n_syllables: tuple[int, int], taken: set[str]) -> list[str]:
    """n distinct capitalised pseudo-words, none in ``taken`` (which is updated)."""
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*n_syllables)))
        if word not in taken and len(word) >= 3:
            taken.add(word)
            words.append(word.capitalize())
    return words


def build_world(cfg: CorpusConfig) -> World:
    rng = random.Random(f"world-{cfg.seed}")
    taken: set[str] = set()
    female = _pseudo_words(rng, cfg.n_first_names, (2, 3), taken)
    male = _pseudo_words(rng, cfg.n_first_names, (2, 3), taken)
    surnames = _pseudo_words(rng, cfg.n_surnames, (2, 4), taken)
    brands = _pseudo_words(rng, cfg.n_brands, (2, 3), taken)
    country_names = _pseudo_words(rng, cfg.n_countries, (2, 3), taken)
    languages = [name + "ish" for name in _pseudo_words(rng, cfg.n_countries, (2, 2), taken)]
    countries = {country: (CONTINENTS[i % len(CONTINENTS)], languages[i]) for i, country in enumerate(country_names)}
    city_names = _pseudo_words(rng, cfg.n_cities, (2, 3), taken)
    cities = {city: country_names[rng.randrange(len(country_names))] for city in city_names}
    return World(tuple(female), tuple(male), tuple(surnames), tuple(brands), countries, cities)


def _bio(rng: random.Random, world: World, cfg: CorpusConfig) -> dict:
    gender = rng.choice(("female", "male"))
    first = rng.choice(world.female_names if gender == "female" else world.male_names)
    last = rng.choice(world.surnames)
    typical, atypical = (
        (PROFESSIONS_FEMALE_TYPICAL, PROFESSIONS_MALE_TYPICAL)
        if gender == "female"
        else (PROFESSIONS_MALE_TYPICAL, PROFESSIONS_FEMALE_TYPICAL)
    )
    pool = typical if rng.random() < cfg.profession_gender_correlation else atypical
    profession = rng.choice(pool)
    city = rng.choice(list(world.cities))
    pronoun, possessive = ("she", "her") if gender == "female" else ("he", "his")
    article = "an" if profession[0] in "aeiou" else "a"
    sentences = [
        f"{first} {last} is {article} {profession} from {city}.",
        rng.choice(
            (
                f"Every morning {pronoun} walks to work past the {rng.choice(NOUNS)}.",
                f"People say {pronoun} is {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}.",
                f"In {possessive} free time {pronoun} {rng.choice(VERBS)} a {rng.choice(NOUNS)}.",
            )
        ),
        f"As {article} {profession}, {first} works at the {PROFESSION_WORK[profession][0]} and {pronoun} "
        f"{PROFESSION_WORK[profession][1]}.",
    ]
    return {
        "kind": "bio",
        "text": " ".join(sentences),
        "labels": {"gender": gender, "profession": profession, "city": city, "name": f"{first} {last}"},
    }


def _review(rng: random.Random, world: World) -> dict:
    category = rng.choice(sorted(REVIEW_CATEGORIES))
    product = rng.choice(REVIEW_CATEGORIES[category])
    brand = rng.choice(world.brands)
    sentiment = rng.choice(("positive", "negative"))
    words = POSITIVE if sentiment == "positive" else NEGATIVE
    verdict = "I would buy it again." if sentiment == "positive" else "I want my money back."
    text = (
        f"Review of the {brand} {product}: this {product} is {rng.choice(words)} and "
        f"{rng.choice(words)}. I use it {CATEGORY_USE[category]}. {verdict} Rating: {5 if sentiment == 'positive' else 1} stars."
    )
    return {"kind": "review", "text": text, "labels": {"category": category, "sentiment": sentiment, "brand": brand}}


def _city(rng: random.Random, world: World) -> dict:
    city = rng.choice(list(world.cities))
    country = world.cities[city]
    continent, language = world.countries[country]
    # One sentence per RAVEL attribute with the city as its subject (RAVEL prompts name only the entity), plus the
    # country's own continent.
    facts = [
        f"{city} is a city in {country}.",
        f"{city} lies in {continent}.",
        f"The people of {city} speak {language}.",
        f"{country} lies in {continent}.",
    ]
    rng.shuffle(facts)
    return {
        "kind": "city",
        "text": " ".join(facts),
        "labels": {"city": city, "country": country, "continent": continent, "language": language},
    }


def _story(rng: random.Random) -> dict:
    a, b = rng.sample(NOUNS, 2)
    sentences = [
        f"Once upon a time a {rng.choice(ADJECTIVES)} {a} lived near the {rng.choice(PLACES_IN_STORY)}.",
        f"One day the {a} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {b}.",
        f"The {b} was {rng.choice(ADJECTIVES)}, so the {a} {rng.choice(VERBS)} it.",
        f"In the end the {a} and the {b} {rng.choice(VERBS)} the {rng.choice(NOUNS)} together.",
    ]
    return {"kind": "story", "text": " ".join(sentences), "labels": {}}


def generate_records(cfg: CorpusConfig, n: int, stream: str = "records") -> list[dict]:
    """n labelled records; ``stream`` separates independent draws from the same world."""
    world = build_world(cfg)
    rng = random.Random(f"{stream}-{cfg.seed}")
    makers = (
        lambda: _bio(rng, world, cfg),
        lambda: _review(rng, world),
        lambda: _city(rng, world),
        lambda: _story(rng),
    )
    return [rng.choices(makers, weights=cfg.kind_weights)[0]() for _ in range(n)]


def generate_records_of_kind(cfg: CorpusConfig, kind: str, n: int, stream: str) -> list[dict]:
    """n labelled records of one kind (bio, review, city or story) from the same world; ``stream`` separates
    independent draws. Used for the labelled evaluation sets, which need many records of one kind."""
    world = build_world(cfg)
    rng = random.Random(f"{stream}-{kind}-{cfg.seed}")
    makers = {
        "bio": lambda: _bio(rng, world, cfg),
        "review": lambda: _review(rng, world),
        "city": lambda: _city(rng, world),
        "story": lambda: _story(rng),
    }
    if kind not in makers:
        raise ValueError(f"kind={kind!r} is not valid; valid: {', '.join(makers)}")
    return [makers[kind]() for _ in range(n)]


def generate_documents(cfg: CorpusConfig) -> list[str]:
    """The corpus: ``cfg.n_documents`` documents, each a blank-line-separated run of records."""
    rng = random.Random(f"documents-{cfg.seed}")
    counts = [rng.randint(*cfg.records_per_document) for _ in range(cfg.n_documents)]
    records = generate_records(cfg, sum(counts), stream="documents")
    documents, start = [], 0
    for count in counts:
        documents.append("\n\n".join(r["text"] for r in records[start : start + count]))
        start += count
    return documents
