"""Text data and token windows: which documents serve which purpose, and how they become tokens.

Every experiment cuts its text into pools of documents that never overlap (`document_plan`): the
calibration pool (WANDA's statistics, and the SAE pruning statistics), the validation and test pools
(held-out losses, the SAE sweep and its test table), and the SAE training stream, which is everything after
them. Pools are index ranges over a (dataset, split), handed out in that order, so two roles that share a
split get consecutive, disjoint ranges by construction: the trained SAE never sees the test text.

Datasets: ``tiny`` (the tiny world's `datasets.DatasetDict` on disk), a local folder (`datasets.load_dataset`
or `load_from_disk` reads it), or a Hugging Face dataset id (streamed: only the documents read are fetched).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the pipeline plans and keys its steps (document_plan) without model libraries
    import torch

ROLES = ("calibration", "validation", "test", "sae_train")


@dataclass(frozen=True)
class DocumentPool:
    """Documents ``[start, stop)`` (``stop`` None: to the end) of one split of one dataset."""

    dataset: str
    split: str
    text_column: str
    start: int
    stop: int | None

    def overlaps(self, other: DocumentPool) -> bool:
        if (self.dataset, self.split) != (other.dataset, other.split):
            return False
        end = lambda pool: float("inf") if pool.stop is None else pool.stop  # noqa: E731
        return self.start < end(other) and other.start < end(self)

    def describe(self) -> str:
        stop = "end" if self.stop is None else self.stop
        return f"{self.dataset}:{self.split}[{self.start}:{stop}]"


def document_plan(exp) -> dict[str, DocumentPool]:
    """The pools of an experiment, disjoint by construction: each (dataset, split) hands out consecutive
    ranges in the order calibration, validation, test, and the SAE training stream takes the rest."""
    taken: dict[tuple[str, str], int] = {}

    def take(dataset: str, split: str, text_column: str, n: int | None) -> DocumentPool:
        start = taken.get((dataset, split), 0)
        if start is None:
            raise ValueError(f"{dataset}:{split} is already taken to its end")
        stop = None if n is None else start + n
        taken[(dataset, split)] = stop
        return DocumentPool(dataset, split, text_column, start, stop)

    cal = exp.calibration
    data = exp.data
    plan = {
        "calibration": take(cal.dataset or data.dataset, cal.split or data.split, cal.text_column or data.text_column, cal.documents),
        "validation": take(data.dataset, data.heldout_split, data.text_column, exp.held_out.documents),
        "test": take(data.dataset, data.test_split, data.text_column, exp.held_out.documents),
        "sae_train": take(data.dataset, data.split, data.text_column, None),
    }
    return plan


def _open_split(dataset: str, split: str, world_dir: str | Path | None, streaming: bool):
    import datasets

    if dataset == "tiny":
        if world_dir is None:
            raise ValueError("dataset=tiny needs the tiny world's directory")
        corpus = datasets.load_from_disk(str(Path(world_dir) / "corpus"))
        if split not in corpus:
            raise ValueError(f"split={split!r} is not in the tiny corpus; valid: {', '.join(corpus)}")
        return corpus[split]
    if Path(dataset).is_dir() and (Path(dataset) / "dataset_dict.json").exists():
        corpus = datasets.load_from_disk(dataset)  # a folder written by `save_to_disk`
        if split not in corpus:
            raise ValueError(f"split={split!r} is not in {dataset}; valid: {', '.join(corpus)}")
        return corpus[split]
    # A Hub id (streamed) or a local folder of data files: the real `load_dataset` path either way.
    return datasets.load_dataset(dataset, split=split, streaming=streaming)


def iter_documents(pool: DocumentPool, world_dir: str | Path | None = None) -> Iterator[str]:
    """The pool's documents in order, read lazily (a Hub dataset is streamed)."""
    import datasets

    split = _open_split(pool.dataset, pool.split, world_dir, streaming=True)
    if not isinstance(split, datasets.IterableDataset):
        n = len(split)
        stop = n if pool.stop is None else min(pool.stop, n)
        for index in range(min(pool.start, n), stop):
            yield split[index][pool.text_column]
        return
    rows = split.skip(pool.start) if pool.start else split
    if pool.stop is not None:
        rows = rows.take(pool.stop - pool.start)
    for row in rows:
        yield row[pool.text_column]


def load_documents(pool: DocumentPool, world_dir: str | Path | None = None) -> list[str]:
    """The pool's documents in memory (a pool with no end would be the whole stream: refused)."""
    if pool.stop is None:
        raise ValueError(f"{pool.describe()} has no end; stream it with iter_documents")
    return list(iter_documents(pool, world_dir))


# --- special tokens and BOS -----------------------------------------------------------------------


def special_token_ids(tokenizer) -> set[int]:
    """BOS, EOS and padding: the positions SAEBench (and Gemma Scope) leave out of reconstruction."""
    return {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}


def special_token_mask(tokens: torch.Tensor, special_ids: set[int]) -> torch.Tensor:
    """True at ordinary tokens, False at BOS/EOS/padding; same shape as ``tokens``."""
    import torch

    mask = torch.ones_like(tokens, dtype=torch.bool)
    for token in special_ids:
        mask &= tokens != token
    return mask


def model_prepends_bos(architecture: str, tokenizer) -> bool:
    """Whether text for this model starts with BOS: Gemma-2 was trained with it at position 0 (its tokenizer
    adds it, and Gemma Scope's SAEs saw it); GPT-2 was not (its tokenizer adds nothing)."""
    if architecture == "Gemma2ForCausalLM":
        return True
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id


def sae_prepends_bos(asked: bool | None, architecture: str, tokenizer) -> bool:
    """Whether an SAE's windows open with BOS: as ``asked`` (its metadata's `prepend_bos`, or the experiment's
    `sae.prepend_bos` for one being trained), else as the model's own text does (`model_prepends_bos`)."""
    return bool(asked) if asked is not None else model_prepends_bos(architecture, tokenizer)


def _encode(tokenizer, text: str) -> list[int]:
    # Documents are joined by EOS and windows get BOS explicitly, so the tokenizer adds nothing.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- windows ------------------------------------------------------------------------------------


def sample_calibration(
    documents: Sequence[str], tokenizer, n_sequences: int, seq_len: int, seed: int = 0, max_tries: int = 100_000, prepend_bos: bool = False
) -> torch.Tensor:
    """WANDA's calibration: ``n_sequences`` windows of ``seq_len`` tokens, each a random window of a
    random document long enough to hold it (as the WANDA reference's C4 loader draws them; no BOS, since a
    random window does not start a document). With ``prepend_bos`` (SAE statistics for a model and SAE that
    saw BOS at position 0) each window is BOS and ``seq_len - 1`` tokens of text.

    Returns ``[n_sequences, seq_len]`` token ids.
    """
    import torch

    if prepend_bos:
        body = sample_calibration(documents, tokenizer, n_sequences, seq_len - 1, seed, max_tries)
        return torch.cat([torch.full((n_sequences, 1), tokenizer.bos_token_id, dtype=torch.long), body], dim=1)
    rng = random.Random(seed)
    windows: list[list[int]] = []
    tries = 0
    while len(windows) < n_sequences:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"found only {len(windows)} of {n_sequences} documents longer than seq_len={seq_len} tokens; "
                "use a shorter calibration.seq_len, more calibration.documents or longer documents"
            )
        ids = _encode(tokenizer, documents[rng.randrange(len(documents))])
        if len(ids) <= seq_len:
            continue
        start = rng.randrange(len(ids) - seq_len)
        windows.append(ids[start : start + seq_len])
    return torch.tensor(windows, dtype=torch.long)


def seed_calibration(documents: Sequence[str], tokenizer, n_ctx: int) -> torch.Tensor:
    """What the paper's code calibrates on in effect: its first document, whole, after BOS, cut at the model's
    context (TransformerLens ``to_tokens``; sae-compression gpt2-small/prune.py lines 119-132: every later
    document re-selects the zeros the first one chose). ``[1, <= n_ctx]``"""
    import torch

    ids = [tokenizer.bos_token_id] + _encode(tokenizer, documents[0])
    return torch.tensor([ids[:n_ctx]], dtype=torch.long)


def iter_windows(documents: Iterator[str] | Sequence[str], tokenizer, seq_len: int, prepend_bos: bool) -> Iterator[list[int]]:
    """The documents as one EOS-separated stream cut into consecutive windows of ``seq_len`` tokens, each
    starting with BOS when ``prepend_bos`` (then ``seq_len - 1`` tokens of text follow it)."""
    for window, _ in iter_windows_with_documents(documents, tokenizer, seq_len, prepend_bos):
        yield window


def iter_windows_with_documents(
    documents: Iterator[str] | Sequence[str], tokenizer, seq_len: int, prepend_bos: bool
) -> Iterator[tuple[list[int], int]]:
    """`iter_windows`'s windows, each with the index (in ``documents``) of the document that holds most of its text
    tokens (a document's EOS counts as its own; a tie goes to the earlier one): the unit a bootstrap resamples, since
    the windows cut from one text are not independent (`evaluate.core_bootstrap`). The indices never decrease."""
    eos = tokenizer.eos_token_id
    body = seq_len - 1 if prepend_bos else seq_len
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text")
    stream: list[int] = []
    owners: list[list[int]] = []  # [document, tokens of it in the stream], in stream order
    for index, document in enumerate(documents):
        ids = _encode(tokenizer, document)
        stream.extend(ids)
        stream.append(eos)
        owners.append([index, len(ids) + 1])
        while len(stream) >= body:
            chunk, stream = stream[:body], stream[body:]
            held, left = {}, body  # document -> its tokens in this chunk
            while left:
                take = min(left, owners[0][1])
                held[owners[0][0]] = take
                owners[0][1] -= take
                left -= take
                if owners[0][1] == 0:
                    owners.pop(0)
            majority = max(held, key=lambda d: (held[d], -d))
            yield (([tokenizer.bos_token_id] + chunk) if prepend_bos else chunk), majority


def held_out_tokens(
    documents, tokenizer, n_sequences: int, seq_len: int, prepend_bos: bool, where: str = "held-out", asked_by: str = "held_out.n_sequences"
) -> torch.Tensor:
    """``[n_sequences, seq_len]`` deterministic held-out windows (see `iter_windows`)."""
    return held_out_windows(documents, tokenizer, n_sequences, seq_len, prepend_bos, where, asked_by)[0]


def held_out_windows(
    documents, tokenizer, n_sequences: int, seq_len: int, prepend_bos: bool, where: str = "held-out", asked_by: str = "held_out.n_sequences"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`held_out_tokens`'s windows ``[n_sequences, seq_len]`` and the document each comes from ``[n_sequences]``
    (`iter_windows_with_documents`)."""
    import torch

    windows, sources = [], []
    for window, document in iter_windows_with_documents(documents, tokenizer, seq_len, prepend_bos):
        windows.append(window)
        sources.append(document)
        if len(windows) == n_sequences:
            return torch.tensor(windows, dtype=torch.long), torch.tensor(sources, dtype=torch.long)
    raise ValueError(
        f"the {where} documents hold {len(windows)} windows of {seq_len} tokens, fewer than {n_sequences}; "
        f"use more held_out.documents or fewer {asked_by}"
    )


@dataclass
class SAETokens:
    """The token ids of SAE work on one model: ``[n, seq]`` windows (BOS first where the SAE saw it)."""

    calibration: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    seed_documents: list[torch.Tensor]
    """wanda-seed only: whole documents (BOS first, cut at the context) the paper's code scores an SAE by."""

    def as_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"calibration_tokens": self.calibration, "validation_tokens": self.validation, "test_tokens": self.test}
        tensors.update({f"seed_document_{i:04d}": doc for i, doc in enumerate(self.seed_documents)})
        return {k: v.contiguous() for k, v in tensors.items()}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> SAETokens:
        seed = [tensors[k] for k in sorted(tensors) if k.startswith("seed_document_")]
        return cls(tensors["calibration_tokens"], tensors["validation_tokens"], tensors["test_tokens"], seed)


def sae_tokens(
    exp, tokenizer, seq_len: int, prepend_bos: bool, world_dir=None, n_ctx: int | None = None, seed_documents: int = 0
) -> SAETokens:
    """Calibration windows (random windows of the calibration pool), validation and test windows (their pools,
    in order), and for wanda-seed the first ``seed_documents`` whole documents of the calibration pool."""
    import torch

    plan = document_plan(exp)
    pool = load_documents(plan["calibration"], world_dir)
    calibration = sample_calibration(pool, tokenizer, exp.calibration.n_sequences, seq_len, exp.calibration.seed, prepend_bos=prepend_bos)
    held = {
        role: held_out_tokens(iter_documents(plan[role], world_dir), tokenizer, exp.held_out.n_sequences, seq_len, prepend_bos, role)
        for role in ("validation", "test")
    }
    documents = [
        torch.tensor(([tokenizer.bos_token_id] + _encode(tokenizer, text))[: n_ctx or seq_len], dtype=torch.long)
        for text in pool[:seed_documents]
    ]
    return SAETokens(calibration, held["validation"], held["test"], documents)


class TokenStream:
    """SAE training text as an iterable of ``{"input_ids": [context_size]}`` windows, streamed from a pool
    (never held in memory), for SAELens's activation store. It counts what it hands out, and a pass beyond
    ``max_passes`` is an error rather than silent repetition."""

    def __init__(self, pool: DocumentPool, tokenizer, context_size: int, prepend_bos: bool, world_dir=None, max_passes: int = 1):
        self.pool, self.tokenizer, self.context_size = pool, tokenizer, context_size
        self.prepend_bos, self.world_dir, self.max_passes = prepend_bos, world_dir, max_passes
        self.windows = 0
        self.passes_completed = 0
        self._latest = 0  # the newest iterator: SAELens peeks at one row through an iterator it then drops
        self._latest_open = False

    def __iter__(self) -> Iterator[dict]:
        if self.passes_completed >= self.max_passes:
            raise ValueError(
                f"the SAE training stream {self.pool.describe()} ran out after {self.passes_completed} pass(es) "
                f"({self.tokens} tokens); set sae.max_passes to go round it again, or train on fewer tokens"
            )
        self._latest += 1
        me = self._latest
        documents = iter_documents(self.pool, self.world_dir)
        for window in iter_windows(documents, self.tokenizer, self.context_size, self.prepend_bos):
            self.windows += 1
            self._latest_open = True
            yield {"input_ids": window}
        self.passes_completed += 1
        if me == self._latest:
            self._latest_open = False

    @property
    def tokens(self) -> int:
        return self.windows * self.context_size

    @property
    def passes(self) -> int:
        """Passes over the stream: the completed ones, and the one under way."""
        return self.passes_completed + int(self._latest_open)


def cross_entropy(model, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of a TransformerLens model over ``tokens [n, seq]``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            loss = model(batch, return_type="loss", loss_per_token=True)  # [batch, seq-1]
            total += loss.double().sum().item()
            count += loss.numel()
    return total / count
