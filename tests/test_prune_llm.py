"""prune_llm is WANDA exactly: masks equal an independent reference, and the structural promises hold."""

from __future__ import annotations

import pytest
import torch
from conftest import random_hf_model, tokenizer_for

from saecomp.models import as_matrix, hf_to_tl, prunable_weights
from saecomp.prune_llm import PruneSpec, group_mask, magnitude_mask, prune_model, seed_mask

ARCHS = ("gpt2", "gemma2")


def linear_modules(hf_model, architecture: str, layer: int) -> dict[str, tuple[torch.nn.Module, bool]]:
    """name -> (module, is_conv1d) for the prunable linear maps of one HF block."""
    if architecture == "gpt2":
        block = hf_model.transformer.h[layer]
        return {
            "c_attn": (block.attn.c_attn, True),
            "attn.c_proj": (block.attn.c_proj, True),
            "c_fc": (block.mlp.c_fc, True),
            "mlp.c_proj": (block.mlp.c_proj, True),
        }
    block = hf_model.model.layers[layer]
    a, m = block.self_attn, block.mlp
    return {
        "q": (a.q_proj, False),
        "k": (a.k_proj, False),
        "v": (a.v_proj, False),
        "o": (a.o_proj, False),
        "gate": (m.gate_proj, False),
        "up": (m.up_proj, False),
        "down": (m.down_proj, False),
    }


@torch.no_grad()
def reference_wanda(hf_model, architecture: str, tokens: torch.Tensor, sparsity: float, nm=None) -> None:
    """WANDA as its paper writes it, on the HF model in nn.Linear orientation [out, in]: hooks on
    every linear map, float64 input norms, layers in order, each scored with earlier layers pruned."""
    n_layers = hf_model.config.num_hidden_layers
    for layer in range(n_layers):
        modules = linear_modules(hf_model, architecture, layer)
        sumsq: dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_hook(
                lambda mod, inp, out, name=name, sumsq=sumsq: sumsq.__setitem__(
                    name, sumsq.get(name, 0) + inp[0].reshape(-1, inp[0].shape[-1]).double().pow(2).sum(0)
                )
            )
            for name, (module, _) in modules.items()
        ]
        hf_model(input_ids=tokens)  # dense pass of this layer, pruned earlier layers
        for h in handles:
            h.remove()
        for name, (module, is_conv1d) in modules.items():
            weight = module.weight.data.T if is_conv1d else module.weight.data  # [out, in]
            score = weight.abs().double() * sumsq[name].sqrt()[None, :]
            mask = torch.zeros_like(weight, dtype=torch.bool)
            if nm is None:
                k = int(weight.shape[1] * sparsity)
                mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
            else:
                n, m = nm
                for start in range(0, weight.shape[1], m):
                    block = score[:, start : start + m]
                    mask.scatter_(1, start + torch.sort(block, dim=1, stable=True).indices[:, :n], True)
            weight[mask] = 0  # in place: `weight` is a view of the parameter


def hf_zero_pattern(hf_model, architecture: str) -> dict[str, torch.Tensor]:
    return {
        f"{layer}.{name}": (module.weight == 0)
        for layer in range(hf_model.config.num_hidden_layers)
        for name, (module, _) in linear_modules(hf_model, architecture, layer).items()
    }


def pruned_pair(architecture: str, spec: PruneSpec, dtype=torch.float64):
    """(our pruned TL model, its HF export, the reference-pruned HF model, tokens)."""
    from saecomp.models import export_to_hf

    ours_hf = random_hf_model(architecture, dtype)
    reference_hf = random_hf_model(architecture, dtype)
    tokens = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))
    tl = tl_of(ours_hf)
    prune_model(tl, tokens, spec, batch_size=4)
    export_to_hf(tl, ours_hf)
    return tl, ours_hf, reference_hf, tokens


def tl_of(hf_model):
    """The TransformerLens model, read as for a real checkpoint: config and tokenizer from a folder."""
    import tempfile

    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp()
    hf_model.config.save_pretrained(folder)
    tokenizer_for().save_pretrained(folder)
    return hf_to_tl(hf_model, AutoTokenizer.from_pretrained(folder), folder)


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_masks_equal_an_independent_reference(architecture, nm):
    spec = PruneSpec("wanda", 0.5, nm)
    _, ours_hf, reference_hf, tokens = pruned_pair(architecture, spec)
    reference_wanda(reference_hf, architecture, tokens, 0.5, nm)
    ours, reference = hf_zero_pattern(ours_hf, architecture), hf_zero_pattern(reference_hf, architecture)
    for name in reference:
        assert reference[name].float().mean() > 0.45, name  # the reference really pruned
        assert torch.equal(ours[name], reference[name]), f"{architecture} {name}: masks differ"


@pytest.mark.parametrize("architecture", ARCHS)
def test_exact_count_per_output_group_and_idempotent(architecture):
    spec = PruneSpec("wanda", 0.3)
    tl, _, _, tokens = pruned_pair(architecture, spec)
    before = {}
    for layer in range(tl.cfg.n_layers):
        for name, w in prunable_weights(tl, layer).items():
            matrix = as_matrix(name, w.data)  # [in, out]: a column is one output unit's group
            zeros_per_column = (matrix == 0).sum(0)
            assert torch.all(zeros_per_column == int(matrix.shape[0] * 0.3)), (layer, name)
            before[(layer, name)] = w.data.clone()
    prune_model(tl, tokens, spec, batch_size=4)
    for (layer, name), w in before.items():
        assert torch.equal(prunable_weights(tl, layer)[name].data, w), "pruning twice changed the model"


@pytest.mark.parametrize("architecture", ARCHS)
def test_nm_pattern_holds_in_every_block(architecture):
    tl, _, _, _ = pruned_pair(architecture, PruneSpec("wanda", 0.0, (2, 4)))
    for layer in range(tl.cfg.n_layers):
        for name, w in prunable_weights(tl, layer).items():
            matrix = as_matrix(name, w.data)
            blocks = (matrix == 0).reshape(matrix.shape[0] // 4, 4, matrix.shape[1]).sum(1)
            assert torch.all(blocks == 2), (layer, name)


@pytest.mark.parametrize("architecture", ARCHS)
def test_exported_hf_model_computes_what_the_pruned_tl_model_computes(architecture):
    tl, ours_hf, _, tokens = pruned_pair(architecture, PruneSpec("wanda", 0.5), dtype=torch.float32)
    tl_logits = tl(tokens)
    hf_logits = ours_hf(input_ids=tokens).logits
    assert (tl_logits - hf_logits).abs().max() < 1e-4
    dense = random_hf_model(architecture, torch.float32)(input_ids=tokens).logits
    assert (dense - hf_logits).abs().max() > 1e-2, "the export carried no pruning"


def test_biases_norms_embeddings_untouched():
    tl, _, _, _ = pruned_pair("gpt2", PruneSpec("wanda", 0.5))
    fresh = tl_of(random_hf_model("gpt2", torch.float64))
    prunable = {
        f"blocks.{layer}.{'attn' if n.startswith('W_') and n[2] in 'QKVO' else 'mlp'}.{n}"
        for layer in range(tl.cfg.n_layers)
        for n in prunable_weights(tl, layer)
    }
    for name, param in tl.state_dict().items():
        if name not in prunable and name in fresh.state_dict():
            assert torch.equal(param, fresh.state_dict()[name]), name


@pytest.mark.parametrize("architecture", ARCHS)
def test_magnitude_differs_from_wanda_with_uneven_input_norms(architecture):
    wanda, _, _, _ = pruned_pair(architecture, PruneSpec("wanda", 0.5))
    magnitude, _, _, _ = pruned_pair(architecture, PruneSpec("magnitude", 0.5))
    differing = sum(
        int(((prunable_weights(wanda, 0)[n] == 0) != (prunable_weights(magnitude, 0)[n] == 0)).sum()) for n in prunable_weights(wanda, 0)
    )
    assert differing > 100


def test_magnitude_is_one_threshold_per_matrix():
    weight = torch.tensor([[0.1, 5.0], [0.2, 6.0], [0.3, 7.0], [0.4, 8.0]])  # [in, out]
    mask = magnitude_mask(weight, 0.5)
    # The whole small column goes: magnitude has no per-output groups.
    assert mask[:, 0].all() and not mask[:, 1].any()
    assert group_mask(weight.abs(), 0.5).sum(0).tolist() == [2, 2]


def test_seed_mask_competes_within_input_rows_by_output_norm():
    weight = torch.ones(4, 6)
    output_norm = torch.arange(6, dtype=torch.float32)
    mask = seed_mask(weight, output_norm, 0.5)
    # Every input row loses its 3 outputs of lowest output norm.
    assert mask.sum(1).tolist() == [3, 3, 3, 3]
    assert mask[:, :3].all()


def test_wanda_seed_prunes_attention_only():
    tl, _, _, _ = pruned_pair("gemma2", PruneSpec("wanda-seed", 0.5))
    weights = prunable_weights(tl, 0)
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        assert (weights[name] == 0).float().mean() > 0.45, name
    for name in ("W_in", "W_gate", "W_out"):
        assert (weights[name] == 0).sum() == 0, name


def test_prune_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="sparsity=1.2"):
        PruneSpec("wanda", 1.2)
    with pytest.raises(ValueError, match="method='foo'"):
        PruneSpec("foo", 0.5)
    with pytest.raises(ValueError, match="nm=4:4"):
        PruneSpec("wanda", 0.5, (4, 4))


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_linear_time_selection_is_the_stable_sorts_first_k(dim):
    """`lowest_mask` replaces a full stable sort: ties (many, here) must go to the lowest indices exactly as the
    sort gives them, for every k including none and all."""
    from saecomp.prune_llm import lowest_mask

    generator = torch.Generator().manual_seed(3)
    score = torch.randint(0, 5, (8, 12, 16), generator=generator).double()  # mostly ties
    n = score.shape[dim]
    for k in (0, 1, n // 2, n - 1, n):
        expected = torch.zeros_like(score, dtype=torch.bool)
        if k:
            expected.scatter_(dim, torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k), True)
        assert torch.equal(lowest_mask(score, k, dim), expected), (dim, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_norms_are_exact_float64_sums_of_exact_squares(dtype):
    """Half-precision activations square exactly in float32; the statistics must equal float64 squares summed
    in float64, bit for bit, whatever the model's dtype."""
    from saecomp.prune_llm import _sum_of_squares

    x = (torch.randn(3000, 40, generator=torch.Generator().manual_seed(4)) * 30).to(dtype)
    assert torch.equal(_sum_of_squares(x), (x.double() * x.double()).sum(0))
