"""The tiny world's settings, importable without torch: an experiment's validation and its world key read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from saecomp.world.text import CorpusConfig


@dataclass(frozen=True)
class TinyModelConfig:
    """One tiny base model and how it is trained."""

    architecture: str
    """`gpt2` (LayerNorm, learned positions) or `gemma2` (RMSNorm, gated MLP, grouped-query attention)."""
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    """Key/value heads (Gemma-2 only; GPT-2 has one per query head)."""
    d_mlp: int = 512
    n_ctx: int = 128
    train_steps: int = 300
    batch_size: int = 16
    """Sequences of `n_ctx` tokens per optimiser step."""
    learning_rate: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class WorldConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    vocab_size: int = 4096
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    models: dict[str, TinyModelConfig] = field(
        default_factory=lambda: {
            "tiny-gpt2": TinyModelConfig("gpt2"),
            "tiny-gemma2": TinyModelConfig("gemma2"),
        }
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def only(self, *names: str) -> WorldConfig:
        """This world with only the named models: what an experiment that uses them needs built. Each model is
        trained from its own seed after the corpus and tokenizer, so a model built alone equals, bit for bit, the one
        built beside the others (tests/test_world.py checks it)."""
        unknown = [name for name in names if name not in self.models]
        if unknown:
            raise ValueError(f"model {', '.join(unknown)} is not among world.models ({', '.join(self.models)})")
        return replace(self, models={name: self.models[name] for name in names})

    @classmethod
    def from_dict(cls, data: dict) -> WorldConfig:
        data = dict(data)
        corpus = CorpusConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("corpus", {}).items()})
        models = {name: TinyModelConfig(**m) for name, m in data.pop("models", {}).items()} or None
        kwargs = {"corpus": corpus, **data}
        if models is not None:
            kwargs["models"] = models
        return cls(**kwargs)
