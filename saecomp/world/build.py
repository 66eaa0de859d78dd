"""Build the tiny world: corpus, tokenizer and two small base models saved as HF checkpoints.

Layout of a built world directory (everything loads with the tool its users know)::

    corpus/              datasets.DatasetDict (train / validation / test), column "text"
    records/             datasets.Dataset of labelled records (kind, text, labels as JSON)
    tokenizer/           Hugging Face tokenizer (AutoTokenizer.from_pretrained)
    tiny-gpt2/           Hugging Face checkpoint (AutoModelForCausalLM.from_pretrained)
    tiny-gemma2/         Hugging Face checkpoint
    world.json           the config that built it, and the measured losses
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saecomp.world.config import TinyModelConfig, WorldConfig  # noqa: F401  (re-exported; torch-free there)
from saecomp.world.text import generate_documents, generate_records

EOS = "<|endoftext|>"
# Gemma's tokenizer starts every text with its own BOS and pads with a token of its own (pad 0, eos 1, bos 2); the
# tiny Gemma-2's does the same, so that what relies on it (SAEBench's RAVEL counts the BOS when it locates the
# entity, and masks padding by id) meets in the tiny world what it meets on Gemma. GPT-2's uses EOS for all three.
GEMMA_BOS = "<bos>"
GEMMA_PAD = "<pad>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE like GPT-2's, trained with `tokenizers`, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, GEMMA_BOS, GEMMA_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def model_tokenizer(tokenizer, architecture: str):
    """The world's tokenizer as ``architecture``'s own behaves: GPT-2's as it is; Gemma-2's adds its BOS to every
    text (``add_special_tokens=False`` skips it, as with Gemma) and pads with its own token."""
    if architecture != "gemma2":
        return tokenizer
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    bos = backend.token_to_id(GEMMA_BOS)
    if bos is None:
        raise ValueError(f"the world's tokenizer has no {GEMMA_BOS} token; rebuild the world")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{GEMMA_BOS} $A", pair=f"{GEMMA_BOS} $A {GEMMA_BOS} $B", special_tokens=[(GEMMA_BOS, bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=GEMMA_BOS, eos_token=EOS, unk_token=EOS, pad_token=GEMMA_PAD)


def hf_config(cfg: TinyModelConfig, vocab_size: int, eos_id: int, bos_id: int | None = None, pad_id: int | None = None):
    """The HF config of one tiny model; ``bos_id``/``pad_id`` default to ``eos_id`` (GPT-2's way)."""
    from transformers import Gemma2Config, GPT2Config

    if cfg.architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.n_ctx,
            n_ctx=cfg.n_ctx,  # real GPT-2 configs carry it and TransformerLens reads it
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_mlp,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            architectures=["GPT2LMHeadModel"],
        )
    if cfg.architecture == "gemma2":
        d_head = cfg.d_model // cfg.n_heads
        return Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_mlp,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=d_head,
            max_position_embeddings=cfg.n_ctx,
            sliding_window=cfg.n_ctx // 2,
            query_pre_attn_scalar=d_head,
            bos_token_id=eos_id if bos_id is None else bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id if pad_id is None else pad_id,
            architectures=["Gemma2ForCausalLM"],
        )
    raise ValueError(f"architecture={cfg.architecture!r} is not valid; valid: gpt2, gemma2")


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All texts as one stream of token ids, each followed by the end-of-text token."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def unigram_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor) -> float:
    """Cross-entropy (nats/token) of the held-out tokens under the training unigram distribution,
    add-one smoothed: the loss a model that ignores context would get."""
    counts = Counter(train_ids.tolist())
    total = len(train_ids) + len(set(eval_ids.tolist()) | set(counts))
    logp = {t: math.log((counts.get(t, 0) + 1) / total) for t in set(eval_ids.tolist())}
    return -sum(logp[t] for t in eval_ids.tolist()) / len(eval_ids)


def bos_first(architecture: str) -> bool:
    """Gemma-2 is trained (and read) with BOS at position 0 of every window, GPT-2 is not: the tiny models copy
    that, so that the BOS handling of SAE work meets in the tiny world what it meets on the real models (with
    :func:`model_tokenizer`'s BOS, as Gemma's own)."""
    return architecture == "gemma2"


def with_bos(windows: torch.Tensor, bos: int) -> torch.Tensor:
    """``[n, n_ctx]`` -> BOS and the first ``n_ctx - 1`` tokens of each window."""
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows[:, :-1]], dim=1)


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor, n_ctx: int, batch_size: int = 16, bos: int | None = None) -> float:
    """Mean loss over consecutive windows of ``ids`` (each starting with ``bos`` when given)."""
    n = (len(ids) - 1) // n_ctx
    windows = ids[: n * n_ctx].view(n, n_ctx)
    if bos is not None:
        windows = with_bos(windows, bos)
    losses = []
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    return sum(losses) / n


def train_model(
    cfg: TinyModelConfig,
    tokenizer,
    train_ids: torch.Tensor,
    validation_ids: torch.Tensor,
    on_step: Callable[[int, dict], None] = lambda step, metrics: None,
):
    """Train one tiny model from scratch with AdamW; returns the HF model. ``tokenizer``: the model's own
    (:func:`model_tokenizer`); the id streams were encoded without special tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    bos = tokenizer.bos_token_id if bos_first(cfg.architecture) else None
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model = AutoModelForCausalLM.from_config(hf_config(cfg, len(tokenizer), eos, tokenizer.bos_token_id, tokenizer.pad_token_id))
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    warmup = max(1, cfg.train_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.train_steps))),
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    n_windows = len(train_ids) - cfg.n_ctx - 1
    model.train()
    started = time.perf_counter()
    for step in tqdm(range(cfg.train_steps), desc=f"training {cfg.architecture}", leave=False, disable=None):  # silent off a terminal
        starts = torch.randint(0, n_windows, (cfg.batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + cfg.n_ctx] for s in starts.tolist()])  # [batch, n_ctx]
        if bos is not None:
            batch = with_bos(batch, bos)
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        metrics = {"train_loss": loss.item()}
        if (step + 1) % max(1, cfg.train_steps // 10) == 0 or step + 1 == cfg.train_steps:
            model.eval()
            metrics["validation_loss"] = mean_loss(
                model, validation_ids[: 64 * cfg.n_ctx + 1], cfg.n_ctx, bos=bos
            )
            model.train()
        metrics["tokens_per_second"] = (step + 1) * cfg.batch_size * cfg.n_ctx / (time.perf_counter() - started)
        on_step(step, metrics)
    model.eval()
    return model


def build_world(
    cfg: WorldConfig,
    out_dir: str | Path,
    on_metrics: Callable[[str, int, dict], None] = lambda model, step, metrics: None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the whole tiny world into ``out_dir``; returns the summary written to ``world.json``."""
    from datasets import Dataset, DatasetDict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"generating {cfg.corpus.n_documents} documents")
    documents = generate_documents(cfg.corpus)
    n_val = max(1, int(len(documents) * cfg.validation_fraction))
    n_test = max(1, int(len(documents) * cfg.test_fraction))
    splits = {
        "train": documents[: len(documents) - n_val - n_test],
        "validation": documents[len(documents) - n_val - n_test : len(documents) - n_test],
        "test": documents[len(documents) - n_test :],
    }
    DatasetDict({name: Dataset.from_dict({"text": texts}) for name, texts in splits.items()}).save_to_disk(str(out_dir / "corpus"))
    records = generate_records(cfg.corpus, 4000, stream="labelled")
    Dataset.from_dict(
        {
            "kind": [r["kind"] for r in records],
            "text": [r["text"] for r in records],
            "labels": [json.dumps(r["labels"]) for r in records],
        }
    ).save_to_disk(str(out_dir / "records"))

    log(f"training a {cfg.vocab_size}-token BPE tokenizer")
    tokenizer = train_tokenizer(splits["train"], cfg.vocab_size)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    train_ids = token_stream(splits["train"], tokenizer)
    validation_ids = token_stream(splits["validation"], tokenizer)
    test_ids = token_stream(splits["test"], tokenizer)
    entropy = unigram_entropy(train_ids, test_ids)
    words = {w for text in splits["train"] for w in text.split()}
    summary: dict = {
        "config": cfg.to_dict(),
        "n_train_tokens": len(train_ids),
        "n_word_types": len(words),
        "unigram_entropy": entropy,
        "models": {},
    }
    log(f"{len(train_ids)} training tokens, {len(words)} word types, unigram entropy {entropy:.3f} nats")

    for name, model_cfg in cfg.models.items():
        log(f"training {name} ({model_cfg.architecture}, {model_cfg.train_steps} steps)")
        started = time.perf_counter()
        own_tokenizer = model_tokenizer(tokenizer, model_cfg.architecture)
        model = train_model(
            model_cfg,
            own_tokenizer,
            train_ids,
            validation_ids,
            on_step=lambda step, metrics, name=name: on_metrics(name, step, metrics),
        )
        bos = own_tokenizer.bos_token_id if bos_first(model_cfg.architecture) else None
        test_loss = mean_loss(model, test_ids, model_cfg.n_ctx, bos=bos)
        model.save_pretrained(out_dir / name, safe_serialization=True)
        own_tokenizer.save_pretrained(out_dir / name)
        summary["models"][name] = {
            "test_loss": test_loss,
            "train_seconds": time.perf_counter() - started,
            "n_parameters": sum(p.numel() for p in model.parameters()),
        }
        log(f"{name}: held-out loss {test_loss:.3f} nats (unigram entropy {entropy:.3f})")
    (out_dir / "world.json").write_text(json.dumps(summary, indent=2))
    return summary
