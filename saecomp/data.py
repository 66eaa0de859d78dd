"""Text data and token windows: calibration sequences, held-out tokens, SAE training text.

The tiny world's corpus is a `datasets.DatasetDict` on disk; OpenWebText and the Pile come from the
Hub through `datasets` (streamed, so only the documents we read are fetched).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch


def load_documents(dataset: str, split: str, text_column: str = "text", world_dir: str | Path | None = None, max_documents: int = 20000):
    """A random-access sequence of documents (a `datasets.Dataset` or a list of strings)."""
    import datasets

    if dataset == "tiny":
        if world_dir is None:
            raise ValueError("dataset=tiny needs the tiny world's directory")
        corpus = datasets.load_from_disk(str(Path(world_dir) / "corpus"))
        if split not in corpus:
            raise ValueError(f"split={split!r} is not in the tiny corpus; valid: {', '.join(corpus)}")
        return corpus[split][text_column]
    streamed = datasets.load_dataset(dataset, split=split, streaming=True)
    documents = []
    for row in streamed:
        documents.append(row[text_column])
        if len(documents) >= max_documents:
            break
    return documents


def sample_calibration(
    documents: Sequence[str], tokenizer, n_sequences: int, seq_len: int, seed: int = 0, max_tries: int = 100_000
) -> torch.Tensor:
    """WANDA's calibration: ``n_sequences`` windows of ``seq_len`` tokens, each a random window of a
    random document long enough to hold it (as the WANDA reference's C4 loader draws them).

    Returns ``[n_sequences, seq_len]`` token ids.
    """
    rng = random.Random(seed)
    windows: list[list[int]] = []
    tries = 0
    while len(windows) < n_sequences:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"found only {len(windows)} of {n_sequences} documents longer than seq_len={seq_len} tokens; "
                "use a shorter calibration.seq_len or longer documents"
            )
        ids = tokenizer(documents[rng.randrange(len(documents))])["input_ids"]
        if len(ids) <= seq_len:
            continue
        start = rng.randrange(len(ids) - seq_len)
        windows.append(ids[start : start + seq_len])
    return torch.tensor(windows, dtype=torch.long)


def contiguous_tokens(documents: Sequence[str], tokenizer, n_sequences: int, seq_len: int, skip_documents: int = 0) -> torch.Tensor:
    """The documents (from ``skip_documents`` on) as one end-of-text-separated stream, cut into
    ``[n_sequences, seq_len]``: deterministic held-out tokens."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = n_sequences * seq_len
    for index in range(skip_documents, len(documents)):
        stream.extend(tokenizer(documents[index])["input_ids"])
        stream.append(eos)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(f"the held-out documents hold {len(stream)} tokens, fewer than {n_sequences} x {seq_len}")
    return torch.tensor(stream[:needed], dtype=torch.long).view(n_sequences, seq_len)


@torch.no_grad()
def cross_entropy(model, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of a TransformerLens model over ``tokens [n, seq]``."""
    total, count = 0.0, 0
    for batch in tokens.split(batch_size):
        loss = model(batch, return_type="loss", loss_per_token=True)  # [batch, seq-1]
        total += loss.double().sum().item()
        count += loss.numel()
    return total / count


def token_windows(documents: Sequence[str], tokenizer, context_size: int, max_tokens: int) -> torch.Tensor:
    """Up to ``max_tokens`` tokens of the documents as consecutive ``context_size`` windows
    ``[n, context_size]`` (fewer if the documents hold fewer): SAE training text."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document)["input_ids"])
        stream.append(eos)
        if len(stream) >= max_tokens:
            break
    n = min(len(stream), max_tokens) // context_size
    if n == 0:
        raise ValueError(f"the documents hold {len(stream)} tokens, fewer than one context of {context_size}")
    return torch.tensor(stream[: n * context_size], dtype=torch.long).view(n, context_size)
