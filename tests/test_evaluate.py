"""evaluate: SAEBench's own core metrics, on the model we pass (the pruned one), as SAEBench's JSON."""

from __future__ import annotations

import collections
import json
import math
import statistics
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from sae_lens import SAE, StandardSAEConfig

from entrypoints import evaluate as evaluate_step
from saecomp.data import DocumentPool, held_out_tokens, held_out_windows, iter_documents, special_token_mask
from saecomp.evaluate import CoreSizes, SplicedLossRecorder, run_core
from saecomp.models import load_model
from saecomp.prune_llm import PruneSpec, prune_model
from saecomp.saes import reconstruction_metrics

SIZES = CoreSizes(batch_size_prompts=4, n_reconstruction_batches=2, n_sparsity_variance_batches=2)
HOOK = "blocks.1.hook_resid_post"


def identity_sae(d_in: int = 32) -> SAE:
    """Reconstructs exactly: relu(x) - relu(-x) = x."""
    sae = SAE.from_dict(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in).to_dict())
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # [d_in, d_sae]
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # [d_sae, d_in]
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = HOOK
    return sae


def random_sae(d_in: int = 32, seed: int = 0) -> SAE:
    sae = SAE.from_dict(StandardSAEConfig(d_in=d_in, d_sae=64).to_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    sae.cfg.metadata.hook_name = HOOK
    return sae


@pytest.fixture(scope="module")
def pruned_and_dense(small_world):
    dense = load_model("tiny-gpt2", small_world / "tiny-gpt2")
    pruned = load_model("tiny-gpt2", small_world / "tiny-gpt2")
    calibration = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    # 80%: the small world's briefly trained model hardly moves at 50%, and the test below tells the two apart
    prune_model(pruned.tl, calibration, PruneSpec("wanda", 0.8))
    # Real text of the world's test split, BOS first, documents separated by EOS.
    test_pool = DocumentPool("tiny", "test", "text", 0, None)
    tokens = held_out_tokens(iter_documents(test_pool, small_world), pruned.tokenizer, SIZES.n_prompts, 64, prepend_bos=True)
    return pruned, dense, tokens


def test_core_writes_saebench_json_with_finite_numbers(pruned_and_dense):
    pruned, _, tokens = pruned_and_dense
    result = run_core(pruned.tl, random_sae(), tokens, {pruned.tokenizer.bos_token_id}, SIZES)
    groups = result.output["eval_result_metrics"]
    assert {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality", "sparsity"} <= set(groups)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert {"core.ce_loss_score", "core.kl_div_score", "core.explained_variance", "core.explained_variance_centred"} <= set(result.metrics)
    assert len(result.output["eval_result_details"]) == 64  # per-latent details stay in the JSON


def test_a_perfect_sae_scores_one_and_a_random_one_far_lower(pruned_and_dense):
    pruned, _, tokens = pruned_and_dense
    special = {pruned.tokenizer.bos_token_id, pruned.tokenizer.eos_token_id}
    perfect_result = run_core(pruned.tl, identity_sae(), tokens, special, SIZES)
    perfect = perfect_result.metrics
    assert perfect["core.ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["core.explained_variance_centred"] == pytest.approx(1.0, abs=1e-5)
    random_result = run_core(pruned.tl, random_sae(), tokens, special, SIZES)
    random = random_result.metrics
    assert random["core.ce_loss_score"] < 0.5
    # SAEBench 0.6's explained_variance is not a variance ratio; ours beside it is.
    assert random["core.explained_variance_centred"] < random["core.explained_variance"]

    # The bootstrap resamples whole sequences: a perfect SAE scores 1 in every resample (its losses move with the
    # model's own, sequence by sequence), a random one does not.
    assert perfect["core.ce_loss_score.bootstrap_se"] < 1e-4
    assert perfect["core.explained_variance_centred.bootstrap_se"] < 1e-6
    assert random["core.ce_loss_score.bootstrap_se"] > 1e-3
    # On the full sample, the bootstrap's statistics are SAEBench's own numbers (and our centred variance).
    boot = random_result.uncertainty
    assert set(boot["full_sample"]) == set(boot["se"]) == {
        "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_with_sae", "kl_div_with_ablation",
        "ce_loss_score", "kl_div_score", "explained_variance_centred",
        "mse", "cossim", "explained_variance", "explained_variance_legacy", "l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio",
        "relative_reconstruction_bias",
        "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
    }  # fmt: skip
    for name, value in boot["full_sample"].items():
        assert value == pytest.approx(random[f"core.{name}"], rel=1e-5, abs=1e-6), name
    # frac_alive: its jackknife over the variance loop's sequences (a bootstrap runs low there), at SAEBench's value
    alive = boot["jackknife"]["frac_alive"]
    assert alive["full_sample"] == pytest.approx(random["core.frac_alive"], abs=1e-7)
    assert alive["n_units"] == boot["n_sequences"]["sparsity_variance"] and alive["unit"] == "sequence"
    assert random["core.frac_alive.jackknife_se"] == alive["se"] and "core.frac_alive.bootstrap_se" not in random
    # the per-latent densities' summaries: every latent of this random SAE is dead or fires on over 10% of the tokens,
    # in every resample too, so the share of all firing those over 10% make is 1 in each, exactly, and its error 0
    # (SAEBench's own float32 masked sum gives it rounding noise, 1e-7: the test once took that noise for a spread)
    assert 0 < random["core.freq_over_10_percent"] == random["core.frac_alive"] < 1
    assert set(boot["samples"]["normalized_freq_over_10_percent"]) == {1.0}
    assert random["core.normalized_freq_over_10_percent.bootstrap_se"] == 0
    assert len(boot["samples"]["freq_over_1_percent"]) == boot["replicates"]  # 64 latents: every replicate resamples them
    # the SAE's weights alone are not resampled
    assert "core.average_max_encoder_cosine_sim.bootstrap_se" not in random
    assert boot["n_sequences"]["spliced_losses"] == SIZES.batch_size_prompts * SIZES.n_reconstruction_batches
    assert boot["n_sequences"]["sparsity_variance"] == SIZES.batch_size_prompts * SIZES.n_sparsity_variance_batches
    # SAEBench normalises mse and explained_variance per batch: the equality above tells that apart from a plain
    # token mean only if the variance batches hold different numbers of ordinary tokens, as here
    per_batch = special_token_mask(tokens[: boot["n_sequences"]["sparsity_variance"]], special).sum(1).reshape(-1, SIZES.batch_size_prompts)
    assert len(set(per_batch.sum(1).tolist())) > 1
    assert perfect["core.cossim"] == pytest.approx(1.0, abs=1e-5) and perfect["core.cossim.bootstrap_se"] < 1e-6
    assert perfect["core.relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["core.relative_reconstruction_bias.bootstrap_se"] < 1e-6 < random["core.relative_reconstruction_bias.bootstrap_se"]
    assert random["core.cossim.bootstrap_se"] > 1e-4 and random["core.mse.bootstrap_se"] > 0
    assert all(len(samples) == boot["replicates"] for samples in boot["samples"].values())
    # compare pairs two variants' replicates: that needs the same sequences, in the same order, resampled alike. The
    # model-only losses then have identical replicates whatever the SAE (a store that shuffled would break this).
    other = perfect_result.uncertainty
    assert other["sample_id"] == boot["sample_id"]
    for name in ("ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_with_ablation"):
        assert other["samples"][name] == pytest.approx(boot["samples"][name], rel=1e-12), name
    assert other["samples"]["ce_loss_with_sae"] != pytest.approx(boot["samples"]["ce_loss_with_sae"], rel=1e-3)
    # a standard error of a mean over the sequences: positive, and far below the CE itself
    assert 0 < random["core.ce_loss_without_sae.bootstrap_se"] < 0.2 * random["core.ce_loss_without_sae"]


def test_a_failed_bootstrap_leaves_saebenchs_core_numbers_and_says_why(pruned_and_dense, monkeypatch):
    from saecomp import evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("resampling went wrong")

    pruned, _, tokens = pruned_and_dense
    monkeypatch.setattr(evaluate, "core_bootstrap", broken)
    with pytest.warns(UserWarning, match="core: no standard errors"):
        result = run_core(pruned.tl, random_sae(), tokens, {pruned.tokenizer.bos_token_id}, SIZES)
    assert math.isfinite(result.metrics["core.ce_loss_score"]) and math.isfinite(result.metrics["core.frac_alive"])
    assert not [name for name in result.metrics if name.endswith("_se") or name.endswith("_centred")]
    assert result.uncertainty is None and "resampling went wrong" in result.tags["saecomp.core.se_failed"]


def centred_reference(model, sae: SAE, tokens: torch.Tensor, special: set[int]) -> float:
    """The centred explained variance computed directly: every ordinary token's activation and reconstruction held
    at once, the textbook formula (`reconstruction_metrics`), no SAEBench."""
    hook_name = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook_name)
        x = cache[hook_name][special_token_mask(tokens, special)]  # [tokens, *hook shape]
        x_hat = sae.decode(sae.encode(x))
    return reconstruction_metrics(x.reshape(x.shape[0], -1), x_hat.reshape(x.shape[0], -1))["explained_variance"]


def test_the_centred_variance_covers_exactly_saebenchs_variance_batches(pruned_and_dense):
    """It is gathered inside SAEBench's sparsity-and-variance loop, so it reads that loop's sequences: with fewer
    variance than reconstruction batches, the first ones only; and the value equals the direct computation."""
    pruned, _, tokens = pruned_and_dense
    special = {pruned.tokenizer.bos_token_id, pruned.tokenizer.eos_token_id}
    sizes = CoreSizes(batch_size_prompts=4, n_reconstruction_batches=2, n_sparsity_variance_batches=1)
    sae = random_sae()
    result = run_core(pruned.tl, sae, tokens, special, sizes)
    read = tokens[: sizes.batch_size_prompts * sizes.n_sparsity_variance_batches]
    assert result.metrics["core.explained_variance_centred"] == pytest.approx(centred_reference(pruned.tl, sae, read, special), rel=1e-6)
    assert result.uncertainty["n_sequences"]["sparsity_variance"] == len(read)
    # over all of core's sequences it would differ: the check above can tell which tokens were read
    assert centred_reference(pruned.tl, sae, tokens[: sizes.n_prompts], special) != pytest.approx(
        result.metrics["core.explained_variance_centred"], rel=1e-6
    )


def saebench_variance_statistics(batches) -> dict[str, float]:
    """SAEBench 0.6's sparsity-and-variance statistics (core/main.py, `get_sparsity_and_variance_metrics`), written
    out from its code for batches of (x, x_hat, latents) already masked to the ordinary tokens, in float64."""
    per_token, mean_squares, mean_per_dim, residuals, biases = {}, [], [], [], []
    for x, x_hat, latents in batches:
        biases.append(x_hat.norm(dim=-1).pow(2).mean() / (x * x_hat).sum(-1).mean())
        rss = (x - x_hat).pow(2).sum(-1)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        values = {
            "mse": rss / x.shape[0],
            "explained_variance_legacy": 1 - rss / (x - x.mean(0)).pow(2).sum(-1),
            "cossim": ((x / x.norm(dim=-1, keepdim=True)) * (x_hat / x_hat.norm(dim=-1, keepdim=True))).sum(-1),
            "l0": (latents != 0).sum(-1).double(),
            "l1": latents.sum(-1),
            "l2_norm_in": norm_in,
            "l2_norm_out": norm_out,
            "l2_ratio": norm_out / torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in),
        }
        for name, value in values.items():
            per_token.setdefault(name, []).append(value)
        mean_squares.append(x.pow(2).sum(-1).mean(0))
        mean_per_dim.append(x.pow(2).mean(0))
        residuals.append(rss.mean(0))
    out = {name: float(torch.cat(parts).mean()) for name, parts in per_token.items()}
    total = torch.stack(mean_squares).mean(0) - torch.cat(mean_per_dim).mean(0) ** 2
    out["explained_variance"] = float(1 - torch.stack(residuals).mean(0) / total)
    out["relative_reconstruction_bias"] = float(torch.stack(biases).mean())
    return out


@pytest.mark.parametrize("flush_every, float32_exact_below", [(256, 2**24), (3, 1)])  # one product; a product per batch, float64
def test_variance_loop_sums_give_saebenchs_statistics_and_a_bootstrap_of_whole_sequences(monkeypatch, flush_every, float32_exact_below):
    """Synthetic batches with unequal ordinary-token counts, latents of both signs and a near-zero input: on the full sample
    every statistic is SAEBench's; each bootstrap replicate is the statistic of the resampled sequences' tokens,
    recomputed directly (each drawn sequence's tokens repeated as often as it was drawn, within its own batch)."""
    from saecomp import evaluate
    from saecomp.evaluate import VarianceLoopSums, core_bootstrap, resampled_sequences
    from saecomp.saes import reconstruction_metrics

    monkeypatch.setattr(evaluate, "DENSITY_FLUSH_SEQUENCES", flush_every)
    monkeypatch.setattr(evaluate, "FLOAT32_EXACT_BELOW", float32_exact_below)

    generator = torch.Generator().manual_seed(0)
    # the per-latent densities resampled with the first 10 of core_bootstrap's own 12 draws (density_replicates)
    draws = resampled_sequences([8], 12, 7)[0][:10]
    sums, batches, sequences, added = VarianceLoopSums(density_draws=draws), [], [], []  # sequences: (batch, x, x_hat, latents)
    firing = torch.tensor([0.0, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9])  # each latent's chance to be non-zero
    for b, (n_seq, pos) in enumerate([(3, 5), (3, 5), (2, 5)]):
        ordinary = torch.rand(n_seq, pos, generator=generator) > 0.3
        ordinary[:, 0] = True  # every sequence keeps a token
        n = int(ordinary.sum())
        x = torch.randn(n, 6, generator=generator, dtype=torch.float64) + 0.5
        x[0] = 1e-6  # an activation of norm under 1e-4: l2_ratio's guard divides by 1 there
        x_hat = x + 0.3 * torch.randn(n, 6, generator=generator, dtype=torch.float64)
        latents = torch.randn(n, 10, generator=generator, dtype=torch.float64) * (torch.rand(n, 10, generator=generator) < firing)
        sums.add(x, x_hat, latents, ordinary)
        added.append((x, x_hat, latents, ordinary))
        batches.append((x, x_hat, latents))
        start = 0
        for count in ordinary.sum(1).tolist():
            sequences.append((b, x[start : start + count], x_hat[start : start + count], latents[start : start + count]))
            start += count
    assert len({len(x) for x, _, _ in batches}) > 1  # unequal batch counts: per-batch means differ from token means
    assert any(bool((latents < 0).any()) for _, _, latents in batches)

    boot = core_bootstrap(SplicedLossRecorder(), sums, replicates=12, seed=7)
    batch_of = torch.tensor([s[0] for s in sequences])
    expected = saebench_variance_statistics(batches)
    every_x, every_x_hat = torch.cat([x for x, _, _ in batches]), torch.cat([x_hat for _, x_hat, _ in batches])
    expected["explained_variance_centred"] = reconstruction_metrics(every_x, every_x_hat)["explained_variance"]
    expected.update(density_summaries(torch.cat([latents for _, _, latents in batches])))
    # frac_alive: the delete-one jackknife over sequences, each deletion recounted from the other sequences' latents
    alive = boot["jackknife"]["frac_alive"]
    assert alive["full_sample"] == pytest.approx(expected.pop("frac_alive"), rel=1e-6)
    without = torch.tensor([density_summaries(torch.cat([s[3] for j, s in enumerate(sequences) if j != i]))["frac_alive"]
                            for i in range(len(sequences))], dtype=torch.float64)  # fmt: skip
    n = len(sequences)
    assert alive["se"] == pytest.approx(float(((n - 1) / n * ((without - without.mean()) ** 2).sum()).sqrt()), rel=1e-9)
    assert alive["se"] > 0 and alive["dies_without"]  # some latents fired in one sequence alone (across batches too)
    assert {int(i) for i in alive["dies_without"]} == {i for i in range(n) if without[i] < alive["full_sample"] - 1e-9}
    assert set(boot["full_sample"]) == set(expected)
    for name, value in expected.items():  # (SAEBench's density summaries are float32 means)
        assert boot["full_sample"][name] == pytest.approx(value, rel=1e-6 if "alive" in name or "freq" in name else 1e-9), name

    # The same draws core_bootstrap made (the spliced losses were empty, so the variance sums drew first).
    picks = torch.randint(len(sequences), (12, len(sequences)), generator=torch.Generator().manual_seed(7))
    assert any(len(set(batch_of[p].tolist())) < len(batches) for p in picks)  # a resample that misses a whole batch
    for r in range(12):
        drawn = [sequences[i] for i in picks[r].tolist()]
        x = torch.cat([s[1] for s in drawn])
        x_hat = torch.cat([s[2] for s in drawn])
        in_batch = torch.cat([torch.full((len(s[1]),), float(len(batches[s[0]][0])), dtype=torch.float64) for s in drawn])
        rss = (x - x_hat).pow(2).sum(-1)
        direct = {
            "explained_variance_centred": reconstruction_metrics(x, x_hat)["explained_variance"],
            "mse": float((rss / in_batch).mean()),
            "l1": float(torch.cat([s[3] for s in drawn]).sum(-1).mean()),
            # SAEBench's ratio of per-batch means: each token weighs 1 / its batch's count
            "explained_variance": float(1 - ((rss / in_batch).sum() / (1 / in_batch).sum()) / (
                (m := (x.pow(2).sum(-1) / in_batch).sum() / (1 / in_batch).sum()) - (m / x.shape[1]) ** 2)),
        }  # fmt: skip
        # per original batch, the drawn tokens' ratio of means, the batches weighed by the share of their tokens drawn
        of_batch = torch.cat([torch.full((len(s[1]),), s[0]) for s in drawn])
        shares, ratios = [], []
        for b in of_batch.unique().tolist():
            here = of_batch == b
            shares.append(float(here.sum()) / len(batches[b][0]))
            ratios.append(float(x_hat[here].pow(2).sum() / (x[here] * x_hat[here]).sum()))
        direct["relative_reconstruction_bias"] = sum(a * b for a, b in zip(shares, ratios, strict=True)) / sum(shares)
        for name, value in direct.items():
            assert boot["samples"][name][r] == pytest.approx(value, rel=1e-9), (name, r)
        if r < len(draws):  # the densities' replicates: the drawn sequences' own latents, counted anew
            for name, value in density_summaries(torch.cat([s[3] for s in drawn])).items():
                if name != "frac_alive":
                    assert boot["samples"][name][r] == pytest.approx(value, rel=1e-6), (name, r)
    assert all(len(boot["samples"][name]) == len(draws) for name in density_summaries(latents) if name != "frac_alive")
    # every latent that fires here fires on over 1% of a resample's few tokens: that share of all firing is 1 in every
    # resample, exactly, and its error 0 (SAEBench's float32 masked sum, row by row, gave rounding noise); the rest move
    assert set(boot["samples"]["normalized_freq_over_1_percent"]) == {1.0} and boot["se"]["normalized_freq_over_1_percent"] == 0
    assert all(se > 0 for name, se in boot["se"].items() if name != "normalized_freq_over_1_percent")
    assert boot["density_replicates"] == len(draws) and "density_skipped" not in boot
    # the densities' resamples must be core's own: other draws are not silently mixed in, and (ours, beside SAEBench's
    # numbers) a mismatch is warned, never raised: the other errors stand
    sums.density_draws = resampled_sequences([8], 12, 8)[0][:10]
    with pytest.warns(UserWarning, match="other draws"):
        mixed = core_bootstrap(SplicedLossRecorder(), sums, replicates=12, seed=7)
    assert "freq_over_1_percent" not in mixed["se"] and mixed["se"]["mse"] == boot["se"]["mse"]
    assert "other draws" in mixed["density_skipped"]
    assert mixed["jackknife"] == boot["jackknife"]  # frac_alive's jackknife draws nothing
    # draws for fewer sequences than SAEBench's loop reads: the loop goes on, warned, without the densities' errors
    short = VarianceLoopSums(density_draws=resampled_sequences([4], 12, 7)[0])
    with pytest.warns(UserWarning, match="more than the 4 sequences"):
        for x, x_hat, latents, ordinary in added:
            short.add(x, x_hat, latents, ordinary)
    cut = core_bootstrap(SplicedLossRecorder(), short, replicates=12, seed=7)
    assert "freq_over_1_percent" not in cut["se"] and cut["se"]["mse"] == boot["se"]["mse"] and "density_skipped" in cut
    assert cut["jackknife"] == boot["jackknife"]


def test_the_density_summaries_of_many_replicates_at_once_are_saebenchs_row_by_row():
    """core's bootstrap scores each replicate's per-latent densities with SAEBench's formulas, many rows a pass: per
    row, the shares over 0, 1% and 10% are exactly SAEBench's `calculate_misc_metrics`; the normalised shares (float32
    sums in another order) agree to float32 rounding. Rows cover densities on the thresholds themselves, a row that
    never fired (SAEBench's 0, not 0/0), and more rows than one pass takes."""
    from sae_bench.evals.core.main import calculate_misc_metrics

    from saecomp.evaluate import DENSITY_SUMMARIES, _density_summaries

    generator = torch.Generator().manual_seed(0)
    tokens = torch.tensor([1000.0, 1000.0, 1000.0, 737.0, 1000.0], dtype=torch.float64)
    fired = torch.randint(0, 40, (5, 3000), generator=generator).double() * (torch.rand(5, 3000, generator=generator) < 0.5)
    fired[1, :500] = 10  # exactly 1% of 1,000 tokens: not over (SAEBench's strict >)
    fired[2, :300] = 100  # exactly 10%
    fired[:, 0] = 400  # a dense latent
    fired[4] = 0  # never fired
    summaries = _density_summaries(fired, tokens, rows_at_once=2)
    weights_only = {"max_encoder_cosine_sim": [0.0], "max_decoder_cosine_sim": [0.0]}
    for row in range(5):
        saebench = calculate_misc_metrics({"feature_density": fired[row].float() / tokens[row].float(), **weights_only})
        for name in DENSITY_SUMMARIES:
            exact = not name.startswith("normalized")
            expected = pytest.approx(saebench[name], rel=0 if exact else 1e-6, abs=0 if exact else 1e-9)
            assert summaries[name].dtype == torch.float64 and float(summaries[name][row]) == expected, (row, name)
    assert float(summaries["normalized_freq_over_1_percent"][4]) == 0.0 and float(summaries["frac_alive"][4]) == 0.0
    assert 0 < float(summaries["freq_over_1_percent"][1]) < float(summaries["frac_alive"][1])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_every_count_of_firing_latents_gives_saebenchs_float32_share_on_every_device(device):
    """A share over a threshold is SAEBench's CPU mean, count / d_sae rounded once in float32, for every count from 0
    to d_sae at GPT-2 small's 6,144 latents: on CUDA, `mean` and a division by a Python number multiply by 1/n and miss
    it by 1 ulp for about a third of the counts (this runs on CUDA where a GPU is present)."""
    import numpy as np

    from saecomp.evaluate import _density_summaries

    d_sae = 6144
    counts = torch.arange(d_sae + 1)
    fired = (torch.arange(d_sae)[None, :] < counts[:, None]).to(device, torch.float32) * 100  # row c: c latents fired
    summaries = _density_summaries(fired, torch.full((d_sae + 1,), 1000.0, dtype=torch.float64), rows_at_once=1000)
    expected = torch.from_numpy(counts.numpy().astype(np.float32) / np.float32(d_sae)).double()
    for name in ("frac_alive", "freq_over_1_percent", "freq_over_10_percent"):  # 100 of 1,000 tokens: over 0 and 1%, not 10%
        want = expected if name != "freq_over_10_percent" else torch.zeros_like(expected)
        assert torch.equal(summaries[name], want), (name, int((summaries[name] != want).sum()))


def test_frac_alives_jackknife_covers_its_true_spread_where_the_bootstrap_runs_low():
    """frac_alive's sampling spread, known by drawing 300 samples of 300 sequences from a fixed population: 300
    latents with per-sequence firing chances from 3e-4 to 0.1 (most of them rare, as in a wide SAE), half of them
    firing more in one of two topics and half in the other (latents that co-fire). The jackknife, counted batch by batch
    as core's loop counts it, must not fall below that spread on average (nor be needlessly wide); a bootstrap of
    sequences falls well below it, which is why frac_alive has no bootstrap. (Seen: jackknife 1.15x the true spread,
    bootstrap 0.69x; with independent latents 1.19x and 0.71x; at 1,000 sequences 1.24x and 0.73x.)"""
    from saecomp.evaluate import VarianceLoopSums, frac_alive_jackknife

    generator = torch.Generator().manual_seed(0)
    samples, n, d_sae, resamples = 300, 300, 300, 200
    chance = 10 ** (torch.rand(d_sae, generator=generator) * 2.5 - 3.5)  # [d_sae]: per sequence
    half = torch.arange(d_sae) % 2
    VarianceLoopSums().count_units_fired(torch.zeros(0, d_sae, dtype=torch.bool))  # an empty batch: nothing, no error
    values, jackknife, bootstrap = [], [], []
    for _ in range(samples):
        topic = (torch.rand(n, 1, generator=generator) < 0.5).long()  # [n, 1]
        fired = torch.rand(n, d_sae, generator=generator) < chance * torch.where(half == topic, 1.8, 0.2)  # [n, d_sae]
        loop = VarianceLoopSums()
        for start in range(0, n, 16):  # SAEBench's batches of 16 sequences
            loop.count_units_fired(fired[start : start + 16])
        found = frac_alive_jackknife(loop.units_fired, loop.last_fired_in, n)
        assert found["full_sample"] == float(fired.any(0).double().mean())
        values.append(found["full_sample"])
        jackknife.append(found["se"])
        drawn = torch.zeros(resamples, n).scatter_add_(1, torch.randint(n, (resamples, n), generator=generator), torch.ones(resamples, n))
        bootstrap.append(float(((drawn @ fired.float()) > 0).double().mean(1).std()))
    true_spread = float(torch.tensor(values).std())
    assert 1.0 <= statistics.mean(jackknife) / true_spread <= 1.5
    assert statistics.mean(bootstrap) / true_spread < 0.85


def test_windows_name_the_document_that_holds_most_of_them():
    """Each window of the EOS-joined stream names the document holding most of its text tokens (a document's EOS is
    its own; a tie goes to the earlier), recounted token by token; the windows are `iter_windows`'s. A window opening
    with the end of one text and going on into the next belongs to the next: naming the document it starts in would
    put it with the wrong text."""
    from conftest import tokenizer_for

    from saecomp.data import iter_windows, iter_windows_with_documents

    tokenizer = tokenizer_for()
    words = "the quick brown fox jumps over the lazy dog".split()
    texts = [" ".join(words[: 1 + i % 9] * (1 + (7 * i) % 5)) for i in range(40)]  # lengths from 1 word to 45
    for seq_len, bos in ((16, False), (16, True), (5, True), (64, False)):
        owner = []  # the document of every token of the stream
        for index, text in enumerate(texts):
            owner += [index] * (len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1)
        body = seq_len - bos
        expected = []
        for start in range(0, len(owner) - body + 1, body):
            held = collections.Counter(owner[start : start + body])
            expected.append(min(held, key=lambda d: (-held[d], d)))
        found = list(iter_windows_with_documents(texts, tokenizer, seq_len, bos))
        assert [w for w, _ in found] == list(iter_windows(texts, tokenizer, seq_len, bos))
        assert [d for _, d in found] == expected, seq_len
        assert all(len(w) == seq_len for w, _ in found)
        starts_elsewhere = [i for i in range(len(expected)) if owner[i * body] != expected[i]]
        assert starts_elsewhere  # windows whose first text token is another document's


def test_core_bootstrap_resamples_whole_documents():
    """A document of two identical windows is one unit: resampling documents draws, replicate by replicate, what
    resampling the distinct windows of a sample without the copies draws (the same statistics, the same errors), and
    frac_alive's jackknife deletes a document at a time. Resampling the copied windows one by one shrinks the errors
    (and its jackknife, where every latent fires in two windows, sees no latent die: error 0)."""
    from saecomp.evaluate import VarianceLoopSums, core_bootstrap, loop_units, resampled_sequences

    generator = torch.Generator().manual_seed(1)
    sequences = []  # (ordinary [pos], x [tokens, d], x_hat, latents [tokens, d_sae], ce [pos], kl [pos])
    firing = torch.tensor([0.02, 0.05, 0.1, 0.3, 0.6, 0.9])
    for _ in range(12):
        ordinary = torch.rand(6, generator=generator) > 0.3
        ordinary[0] = True
        n = int(ordinary.sum())
        x = torch.randn(n, 4, generator=generator, dtype=torch.float64) + 0.5
        latents = torch.rand(n, 6, generator=generator, dtype=torch.float64) * (torch.rand(n, 6, generator=generator) < firing)
        x_hat = x + 0.3 * torch.randn(n, 4, generator=generator, dtype=torch.float64)
        ce, kl = torch.rand(2, 6, generator=generator, dtype=torch.float64)
        sequences.append((ordinary, x, x_hat, latents, ce, kl))

    def bootstrap(rows, per_batch, documents):
        """core_bootstrap over ``rows`` (indices into ``sequences``) read ``per_batch`` sequences a batch."""
        units = None if documents is None else loop_units(documents, len(rows))
        draws = resampled_sequences([len(rows) if units is None else units] * 2, 400, 7)[1][:10]
        spliced, variance = SplicedLossRecorder(), VarianceLoopSums(density_draws=draws, units=units)
        for start in range(0, len(rows), per_batch):
            batch = [sequences[i] for i in rows[start : start + per_batch]]
            ordinary = torch.stack([s[0] for s in batch])
            tokens = torch.where(ordinary, 5, 0)  # token 0 special where not ordinary
            losses = {"ce_loss_with_sae": torch.stack([s[4] for s in batch]), "kl_div_with_sae": torch.stack([s[5] for s in batch])}
            spliced.add(tokens, losses, {0})
            variance.add(*(torch.cat([s[i] for s in batch]) for i in (1, 2, 3)), ordinary)
        return core_bootstrap(spliced, variance, replicates=400, seed=7, documents=documents)

    distinct = bootstrap(list(range(12)), 4, None)
    copies = [i for i in range(12) for _ in (0, 1)]  # each window twice in a row, a batch holding a batch's copies
    by_document = bootstrap(copies, 8, torch.tensor(copies))
    by_window = bootstrap(copies, 8, None)
    assert by_document["unit"].startswith("document") and by_document["n_units"] == {"spliced_losses": 12, "sparsity_variance": 12}
    assert distinct["unit"] == "sequence" and by_window["n_units"] == {"spliced_losses": 24, "sparsity_variance": 24}
    assert set(by_document["samples"]) == set(distinct["samples"]) and "freq_over_1_percent" in distinct["samples"]
    for name, values in distinct["samples"].items():
        scale = 0.5 if name == "mse" else 1.0  # SAEBench's mse divides a token's error by its batch's count, here doubled
        assert by_document["samples"][name] == pytest.approx([scale * v for v in values], rel=1e-12, abs=1e-15), name
        assert by_document["full_sample"][name] == pytest.approx(scale * distinct["full_sample"][name], rel=1e-12), name
    assert by_window["se"]["mse"] < 0.85 * by_document["se"]["mse"]
    # four documents are too few to resample (MIN_BOOTSTRAP_UNITS): the full sample stands, no error is claimed
    few = bootstrap(copies[:8], 8, torch.tensor(copies[:8]))
    assert few["se"] == {} == few["samples"] and "jackknife" not in few and "too few test documents" in few["se_skipped"]
    assert few["full_sample"]["l1"] == pytest.approx(bootstrap(list(range(4)), 4, None)["full_sample"]["l1"], rel=1e-12)
    jackknife, alone = by_document["jackknife"]["frac_alive"], distinct["jackknife"]["frac_alive"]
    assert jackknife["se"] == pytest.approx(alone["se"], rel=1e-12) and jackknife["dies_without"] == alone["dies_without"] != {}
    assert jackknife["n_units"] == 12 and by_window["jackknife"]["frac_alive"]["se"] == 0


def test_core_bootstraps_error_covers_its_true_spread_where_texts_run_over_several_windows():
    """A mean over test windows whose texts run over 1 to 6 windows each, every text with its own level that its
    windows share (as a hard text is hard throughout): its spread, known from 300 samples, is what resampling the
    documents finds; resampling the windows one by one runs far below it (seen: 0.97x and 0.51x)."""
    from saecomp.evaluate import loop_units, resampled_sequences

    generator = torch.Generator().manual_seed(0)
    values, by_document, by_window = [], [], []
    for _ in range(300):
        lengths = torch.randint(1, 7, (64,), generator=generator)  # windows per text
        documents = torch.repeat_interleave(torch.arange(64), lengths)[:128]  # core reads the first 128 windows
        n = len(documents)
        level = torch.randn(64, generator=generator, dtype=torch.float64)[documents]  # [n]: each window's text's
        per_window = level + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
        tokens = torch.full((n,), 60.0, dtype=torch.float64)
        values.append(float((per_window * tokens).sum() / tokens.sum()))
        for loop, errors in ((loop_units(documents, n), by_document), (n, by_window)):
            weights = resampled_sequences([loop], 200, int(torch.randint(10**6, (1,), generator=generator)))[0]  # [200, n]
            errors.append(float(((weights @ (per_window * tokens)) / (weights @ tokens)).std()))
    true_spread = float(torch.tensor(values).std())
    assert 0.85 <= statistics.mean(by_document) / true_spread <= 1.15
    assert statistics.mean(by_window) / true_spread < 0.7


def test_core_sample_ids_tell_document_from_window_resampling():
    """compare pairs two runs' replicates only where their sample ids agree: the same windows resampled by document
    and by window (or by other documents) are other resamples, so their ids differ; the same reading has one id."""
    from saecomp.evaluate import core_sample_id

    tokens = torch.arange(64 * 8).reshape(64, 8)
    documents = torch.arange(64) // 4
    ids = {
        "windows": core_sample_id(tokens, {0}, SIZES, None),
        "documents": core_sample_id(tokens, {0}, SIZES, documents),
        "other documents": core_sample_id(tokens, {0}, SIZES, torch.arange(64) // 2),
        "other tokens": core_sample_id(tokens + 1, {0}, SIZES, documents),
        "other specials": core_sample_id(tokens, {0, 1}, SIZES, documents),
    }
    assert len(set(ids.values())) == len(ids)
    assert core_sample_id(tokens.clone(), {0}, SIZES, documents.clone()) == ids["documents"]
    # past what core reads (SIZES.n_prompts windows), nothing counts
    assert core_sample_id(torch.cat([tokens[:8], tokens[8:] + 1]), {0}, SIZES, documents) == ids["documents"]


def test_frac_alives_jackknife_deletes_documents_that_straddle_batches():
    """Counted batch by batch, with documents of 1 to 7 windows that run across SAEBench's batches of 16: each
    latent's count of documents it fired in, and the jackknife, are those recounted from the whole firing table."""
    from saecomp.evaluate import VarianceLoopSums, frac_alive_jackknife, loop_units

    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 8, (40,), generator=generator)
    lengths[5] = 40  # a document over more than two whole batches
    documents = torch.repeat_interleave(torch.arange(40) * 3, lengths)  # numbered with gaps, as a pool's indices are
    n, d_sae = len(documents), 200
    fired = torch.rand(n, d_sae, generator=generator) < 10 ** (torch.rand(d_sae, generator=generator) * 2.5 - 3)
    units = loop_units(documents, n)
    loop = VarianceLoopSums(units=units)
    for start in range(0, n, 16):
        loop.count_units_fired(fired[start : start + 16])
    by_document = torch.stack([fired[units == u].any(0) for u in range(40)])  # [documents, d_sae]
    assert torch.equal(loop.units_fired, by_document.sum(0))
    assert torch.equal(loop.last_fired_in, torch.where(by_document.any(0), 39 - by_document.flip(0).int().argmax(0), -1))
    found = frac_alive_jackknife(loop.units_fired, loop.last_fired_in, 40, "document")
    alive_without = [float(torch.cat([by_document[:u], by_document[u + 1 :]]).any(0).double().mean()) for u in range(40)]
    without = torch.tensor(alive_without, dtype=torch.float64)
    assert found["se"] == pytest.approx(float((39 / 40 * ((without - without.mean()) ** 2).sum()).sqrt()), rel=1e-9)
    assert found["se"] > 0 and found["full_sample"] == float(fired.any(0).double().mean())


def density_summaries(latents: torch.Tensor) -> dict[str, float]:
    """SAEBench's summaries of per-latent densities, from the latents themselves ([tokens, d_sae]): the share of
    tokens where each latent is above 0, then the share of latents alive / over 1% / over 10%, and the share of all
    firing that those over 1% / 10% make."""
    density = (latents > 0).double().mean(0)
    out = {"frac_alive": float((density > 0).double().mean())}
    for percent in (1, 10):
        over = density > percent / 100
        out[f"freq_over_{percent}_percent"] = float(over.double().mean())
        out[f"normalized_freq_over_{percent}_percent"] = float(density[over].sum() / density.sum())
    return out


def test_shadowed_restores_what_was_there():
    """The recorders shadow methods with instance attributes; one already there (another adapter's) comes back."""
    from saecomp.evaluate import shadowed

    class Thing:
        def method(self):
            return "class"

    thing = Thing()
    with shadowed(thing, method=lambda: "outer"):
        with shadowed(thing, method=lambda: "inner"):
            assert thing.method() == "inner"
        assert thing.method() == "outer"
    assert thing.method() == "class" and "method" not in vars(thing)
    with pytest.raises(RuntimeError), shadowed(thing, method=lambda: "during"):
        raise RuntimeError
    assert "method" not in vars(thing)


def random_layer_norm_jumprelu_sae(d_in: int, hook_name: str, **config) -> SAE:
    """A JumpReLU SAE with layer-norm input normalisation (Gemma Scope's architecture, GPT-2's normalisation) and random
    weights (small thresholds, so that latents fire)."""
    from sae_lens import JumpReLUSAEConfig

    sae = SAE.from_dict(JumpReLUSAEConfig(d_in=d_in, d_sae=2 * d_in, normalize_activations="layer_norm", **config).to_dict())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.01 if "threshold" in name else 0.3))
    sae.cfg.metadata.hook_name = hook_name
    return sae


def test_core_bootstrap_on_gemma2_with_a_layer_norm_jumprelu_hook_z_sae(small_world):
    """What the real Gemma files meet: BOS first and excluded, an attention-output SAE that reshapes hook_z, layer-norm
    normalisation and JumpReLU. The bootstrap's full-sample statistics are still SAEBench's numbers."""

    loaded = load_model("tiny-gemma2", small_world / "tiny-gemma2")
    cfg, tokenizer = loaded.tl.cfg, loaded.tokenizer
    width = cfg.n_heads * cfg.d_head
    sae = random_layer_norm_jumprelu_sae(width, "blocks.1.attn.hook_z", reshape_activations="hook_z")
    tokens, documents = held_out_windows(
        iter_documents(DocumentPool("tiny", "test", "text", 0, None), small_world), tokenizer, SIZES.n_prompts, 64, prepend_bos=True
    )
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    with pytest.raises(ValueError, match="never decreasing"):  # refused before any compute
        run_core(loaded.tl, sae, tokens, special, SIZES, documents=documents.flip(0))
    result = run_core(loaded.tl, sae, tokens, special, SIZES, documents=documents)
    boot = result.uncertainty
    # resampled by document: this world's test texts hold several windows of 64 tokens each, so the 8 windows read
    # come from too few texts to resample (MIN_BOOTSTRAP_UNITS): no error is claimed, and the tag says why
    assert boot["unit"].startswith("document") and boot["n_units"]["sparsity_variance"] == len(documents.unique()) < 5
    assert boot["se"] == {} and "jackknife" not in boot and not [m for m in result.metrics if m.endswith("_se")]
    assert "too few test documents" in result.tags["saecomp.core.se_skipped"] == boot["se_skipped"]
    # the same windows resampled one by one (as if each its own text): the errors, on this hook_z SAE
    by_window = run_core(loaded.tl, sae, tokens, special, SIZES)
    assert by_window.metrics == {**result.metrics, **{m: v for m, v in by_window.metrics.items() if m.endswith("_se")}}
    boot = by_window.uncertainty
    for name, value in boot["full_sample"].items():
        # SAEBench averages in float32, the bootstrap in float64; a score is a ratio of differences of those means
        # (here far from 1: the random SAE wrecks the model), which amplifies that rounding
        tolerance = 2e-4 if name.endswith("_score") else 1e-5
        assert value == pytest.approx(result.metrics[f"core.{name}"], rel=tolerance, abs=1e-6), name
    assert all(math.isfinite(se) for se in boot["se"].values())
    # (a count of latents over a threshold may not move in any resample: none need lie near it; nor the share of all
    # firing they make, where every live latent is over it in every resample: then it is 1 throughout)
    assert all(se > 0 for name, se in boot["se"].items() if "alive" not in name and "freq_over" not in name), boot["se"]
    for name in ("normalized_freq_over_1_percent", "normalized_freq_over_10_percent"):
        assert boot["se"][name] > 0 or set(boot["samples"][name]) == {boot["full_sample"][name]}, name
    # the document path end to end on Gemma-2: each window its own document draws exactly the per-window resamples
    # (every error and the jackknife), and windows grouped into six documents per loop get errors of their own
    as_documents = run_core(loaded.tl, sae, tokens, special, SIZES, documents=torch.arange(len(tokens)))
    assert as_documents.metrics == by_window.metrics and as_documents.uncertainty["n_units"]["sparsity_variance"] == len(tokens)
    assert as_documents.uncertainty["se"] == by_window.uncertainty["se"]
    grouped = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5] * (len(tokens) // 8))
    grouped += torch.arange(len(tokens)) // 8 * 6  # a reading of more than 8 windows keeps its documents distinct
    in_documents = run_core(loaded.tl, sae, tokens, special, SIZES, documents=grouped)
    assert in_documents.uncertainty["n_units"]["sparsity_variance"] == 6 and in_documents.uncertainty["se"]
    assert {m: v for m, v in in_documents.metrics.items() if not m.endswith("_se")} == result.metrics
    assert in_documents.uncertainty["se"] != by_window.uncertainty["se"]
    assert all(math.isfinite(se) for se in in_documents.uncertainty["se"].values())
    # read from SAEBench's loop, which flattens hook_z's heads before the SAE (whose layer norm then sees one row per
    # token): the same number as the SAE applied to the model's own [tokens, heads, d_head] activations
    read = tokens[: SIZES.batch_size_prompts * SIZES.n_sparsity_variance_batches]
    assert result.metrics["core.explained_variance_centred"] == pytest.approx(centred_reference(loaded.tl, sae, read, special), rel=1e-5)


def test_core_in_a_bfloat16_gemma2_with_a_layer_norm_jumprelu_sae(small_world):
    """gemma-2-2b.yaml evaluates in bfloat16: SAEBench's core gets the SAE cast to the model's bfloat16, as its own
    `run_eval` casts it; the recorder reads the same bfloat16 latents and reconstructions and sums in float64, so its
    full-sample values agree with SAEBench's bfloat16 sums only to that rounding. (At this
    tiny model's attention output, zero ablation moves its bfloat16 mean CE by less than bfloat16 resolves, and
    SAEBench's own ce_loss_score divides by zero: resid_post here.)"""

    loaded = load_model("tiny-gemma2", small_world / "tiny-gemma2", "bfloat16")
    assert next(loaded.tl.parameters()).dtype == torch.bfloat16
    cfg, tokenizer = loaded.tl.cfg, loaded.tokenizer
    sae = random_layer_norm_jumprelu_sae(cfg.d_model, "blocks.1.hook_resid_post")
    tokens = held_out_tokens(
        iter_documents(DocumentPool("tiny", "test", "text", 0, None), small_world), tokenizer, SIZES.n_prompts, 64, prepend_bos=True
    )
    result = run_core(loaded.tl, sae, tokens, {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}, SIZES)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.output["sae_cfg_dict"]["dtype"] == "bfloat16" and sae.W_enc.dtype == torch.float32  # a cast copy
    full = result.uncertainty["full_sample"]
    for name in ("mse", "cossim", "l0", "l2_norm_in", "l2_norm_out", "explained_variance_centred", "ce_loss_without_sae"):
        assert full[name] == pytest.approx(result.metrics[f"core.{name}"], rel=2e-2), name
    # the firing counts come from the very latents SAEBench counts (the bfloat16 SAE's): its density summaries exactly
    from saecomp.evaluate import DENSITY_SUMMARIES

    full = {**full, "frac_alive": result.uncertainty["jackknife"]["frac_alive"]["full_sample"]}  # (frac_alive: its jackknife's)
    for name in DENSITY_SUMMARIES:
        assert full[name] == pytest.approx(result.metrics[f"core.{name}"], rel=1e-6), name
    se = result.uncertainty["se"]
    assert all(math.isfinite(v) and v >= 0 for v in se.values())
    assert min(se["mse"], se["cossim"], se["explained_variance_centred"], se["ce_loss_with_sae"]) > 0


def test_core_measures_the_model_it_is_given(pruned_and_dense):
    pruned, dense, tokens = pruned_and_dense
    special = {pruned.tokenizer.bos_token_id, pruned.tokenizer.eos_token_id}
    core = run_core(pruned.tl, random_sae(), tokens, special, SIZES).metrics

    def own_cross_entropy(model):
        # SAEBench leaves out the predictions made from BOS/EOS/padding (mask[:, :-1]).
        used = tokens[: SIZES.batch_size_prompts * SIZES.n_reconstruction_batches]
        with torch.no_grad():
            loss = model(used, return_type="loss", loss_per_token=True)  # [n, seq - 1]
        return float(loss[special_token_mask(used, special)[:, :-1]].double().mean())

    assert core["core.ce_loss_without_sae"] == pytest.approx(own_cross_entropy(pruned.tl), abs=1e-4)
    # five times the tolerance of the match above (the small model is close to unigram: pruning moves it little)
    assert abs(own_cross_entropy(dense.tl) - core["core.ce_loss_without_sae"]) > 5e-4


def all_runs():
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=2000)


def test_evaluate_step_as_typed(small_experiment):
    result = CliRunner().invoke(
        evaluate_step.main, ["--experiment", str(small_experiment), "--variant", "pretrained"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    runs = [r for r in all_runs() if r.data.tags.get("saecomp.step") == "evaluate"]
    run = sorted(runs, key=lambda r: r.info.start_time)[-1]
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == "pretrained" and run.data.params["pruned_model_run"] != "none (dense)"
    m = run.data.metrics
    # (the small world's model is close to unigram, so zero ablation costs it little and the score is ill-conditioned:
    # check that it is SAEBench's ratio of the logged losses rather than a range)
    ablated, clean, spliced = m["core.ce_loss_with_ablation"], m["core.ce_loss_without_sae"], m["core.ce_loss_with_sae"]
    ratio = (ablated - spliced) / (ablated - clean)
    assert math.isfinite(m["core.ce_loss_score"]) and m["core.ce_loss_score"] == pytest.approx(ratio, rel=1e-4, abs=1e-4)
    assert m["core.seconds"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "saebench")}
    assert artifacts == {"saebench/core.json"}
    # the bootstrap behind core.<metric>.bootstrap_se is an artifact too, its standard errors those logged
    boot = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="uncertainty/core.json")).read_text())
    logged = {name: value for name, value in m.items() if name.endswith(".bootstrap_se")}
    assert {f"core.{name}.bootstrap_se": se for name, se in boot["se"].items()} == logged
    assert m["core.ce_loss_with_sae.bootstrap_se"] > 0
    # resampled by test document, each window's document an artifact beside its tokens
    from safetensors.torch import load_file

    windows = load_file(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="tokens.safetensors"))
    assert windows["test_documents"].shape == windows["test_tokens"].shape[:1]
    assert boot["unit"].startswith("document") and boot["jackknife"]["frac_alive"]["unit"] == "document"
    first = windows["test_documents"][: boot["n_sequences"]["sparsity_variance"]]
    assert boot["n_units"]["sparsity_variance"] == len(first.unique()) < boot["n_sequences"]["sparsity_variance"]


def test_ravel_from_the_experiment_is_tagged_not_applicable_on_gpt2(small_experiment):
    """What the pipeline asks (`--inapplicable tag`): the other suites run, RAVEL gets a reason and no number."""
    result = CliRunner().invoke(
        evaluate_step.main,
        ["--experiment", str(small_experiment), "--variant", "pretrained", "--suites", "core,ravel", "--inapplicable", "tag"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    run = sorted((r for r in all_runs() if r.data.tags.get("saecomp.step") == "evaluate"), key=lambda r: r.info.start_time)[-1]
    assert run.info.status == "FINISHED" and run.data.params["suites"] == "core,ravel"
    assert "this model is GPT2LMHeadModel" in run.data.tags["saecomp.ravel.not_applicable"]
    assert "core.ce_loss_score" in run.data.metrics and not [m for m in run.data.metrics if m.startswith("ravel.") and m != "ravel.seconds"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--suites", "core,vibes"], "suite='vibes' is not valid; valid: core, absorption, scr, tpp, sparse_probing, ravel"),
        (
            ["--suites", "ravel"],
            "suites=ravel cannot run here: SAEBench's RAVEL intervenes only on Gemma2ForCausalLM and GPTNeoXForCausalLM decoder "
            "layers; this model is GPT2LMHeadModel; valid: an SAE at hook_resid_post of a Gemma-2 model",
        ),
        (["--model", "0123456789abcdef0123456789abcdef"], "model='0123456789abcdef0123456789abcdef' is not valid"),
        (["--sae", "WIDE"], "the SAE's d_in=48 does not fit blocks.1.hook_resid_post of tiny-gpt2, whose width is 32"),
        (["--sae", "FAR"], "the SAE's hook blocks.9.hook_resid_post does not fit tiny-gpt2"),
        (["--sae", "/nonexistent/sae"], "sae='/nonexistent/sae' is not a loadable SAE (SAE source '/nonexistent/sae' is no folder here"),
        (["--seed", "abc"], "evaluation.seed='abc' is not an integer"),  # one line, as every other field (not click's usage block)
        (["--seed", "-3"], "evaluation.seed=-3 is not valid; valid: a whole number in 0..4294967295"),  # numpy/pandas would crash mid-suite
    ],
)
def test_bad_input_is_rejected_before_any_run(small_experiment, tmp_path, args, message):
    for name, d_in, hook in (("WIDE", 48, HOOK), ("FAR", 32, "blocks.9.hook_resid_post")):
        sae = random_sae(d_in)
        sae.cfg.metadata.hook_name = hook
        sae.save_model(str(tmp_path / name))
    args = [str(tmp_path / a) if a in ("WIDE", "FAR") else a for a in args]
    before = len(all_runs())
    result = CliRunner().invoke(evaluate_step.main, ["--experiment", str(small_experiment), *args])
    assert result.exit_code == 2, result.output
    assert f"saecomp: error: {message}" in result.output
    assert len(all_runs()) == before


def k_sparse_probe_scores(n_per_letter: int = 20, max_k: int = 5, seed: int = 0):
    """SAEBench's raw k-sparse probing results and metadata in its columns, for 26 letters of ``n_per_letter`` test
    words each: letter i's k-sparse probe finds a share of its words that grows with k by a step of its own (large for
    some letters, so that their F1 keeps rising by more than SAEBench's 0.03 and they split; none for others), and says
    yes to a few other words."""
    import numpy as np
    import pandas as pd
    from sae_bench.evals.absorption.vocab import LETTERS

    rng = np.random.default_rng(seed)
    answers = np.repeat(list(LETTERS), n_per_letter)
    scores, metadata = {"answer_letter": answers}, []
    for i, letter in enumerate(LETTERS):
        mine = answers == letter
        scores[f"score_probe_{letter}"] = np.where(mine, 1.0, -1.0) + rng.normal(0, 0.5, len(answers))
        step = (0.0, 0.04, 0.12)[i % 3]
        for k in range(1, max_k + 1):
            found = mine & (rng.random(len(answers)) < min(1.0, 0.5 + step * k))
            false_yes = ~mine & (rng.random(len(answers)) < 0.01)
            scores[f"score_sparse_sae_{letter}_k_{k}"] = np.where(found | false_yes, 1.0, -1.0) * rng.uniform(0.1, 2, len(answers))
            scores[f"sum_sparse_sae_{letter}_k_{k}"] = scores[f"score_sparse_sae_{letter}_k_{k}"] + rng.normal(0, 0.1, len(answers))
            unused = {"cos_probe_sae_enc": np.zeros(k), "cos_probe_sae_dec": np.zeros(k), "weights": np.ones(k), "bias": 0.0}
            metadata.append({"letter": letter, "k": k, "feats": np.arange(k), "layer": 0, "sae_name": "sae", **unused})
    return pd.DataFrame(scores), pd.DataFrame(metadata)


def test_saebenchs_absorption_gets_the_alphabetic_tokens_in_one_order_whatever_the_tokenizers_dict_order(small_world):
    """A fast tokenizer's ``vocab`` dict comes from a Rust hash map, in another order in every process, and SAEBench's
    absorption shuffles the alphabetic tokens in that order: with one seed, other probe words in every run. Under
    `alphabetic_tokens_in_one_order` both of SAEBench's readers list them in one order whatever the dict's, and
    the seeded split SAEBench draws from them is one split; outside it, SAEBench's own functions again."""
    import random

    from sae_bench.evals.absorption import common, feature_absorption
    from sae_bench.evals.absorption.probing import create_dataset_probe_training
    from sae_bench.evals.absorption.prompting import first_letter_formatter
    from transformers import AutoTokenizer

    from saecomp.evaluate import alphabetic_tokens_in_one_order

    tokenizer = AutoTokenizer.from_pretrained(small_world / "tiny-gpt2")

    class Reordered:  # the same tokenizer as another process lists it
        vocab = dict(reversed(list(tokenizer.vocab.items())))
        convert_tokens_to_string = staticmethod(tokenizer.convert_tokens_to_string)

    originals = (common.get_alpha_tokens, feature_absorption.get_alpha_tokens)
    assert common.get_alpha_tokens(tokenizer) != common.get_alpha_tokens(Reordered())  # SAEBench's own: the dict's order
    assert sorted(common.get_alpha_tokens(tokenizer)) == sorted(common.get_alpha_tokens(Reordered()))

    def probe_words(vocab: list[str]) -> list[str]:
        random.seed(42)
        train, _ = create_dataset_probe_training(vocab, first_letter_formatter(), num_prompts_per_token=1, base_template="{word}:")
        return [prompt.word for prompt, _ in train]

    with alphabetic_tokens_in_one_order():
        for module in (common, feature_absorption):
            assert module.get_alpha_tokens(tokenizer) == module.get_alpha_tokens(Reordered()) == sorted(originals[0](tokenizer))
        split = probe_words(common.get_alpha_tokens(tokenizer))
        assert split == probe_words(feature_absorption.get_alpha_tokens(Reordered()))
    assert (common.get_alpha_tokens, feature_absorption.get_alpha_tokens) == originals
    assert probe_words(originals[0](tokenizer)) != probe_words(originals[0](Reordered()))


def test_absorption_runs_with_saebenchs_alphabetic_tokens_in_one_order(monkeypatch):
    """`run_absorption` runs SAEBench's absorption under `alphabetic_tokens_in_one_order`, and that covers every
    module of SAEBench's absorption that reads the alphabetic tokens (a new reader in a later SAEBench shows here)."""
    import importlib
    import pkgutil
    from types import SimpleNamespace

    from sae_bench.evals import absorption
    from sae_bench.evals.absorption import common, vocab

    import saecomp.evaluate as evaluate_lib

    readers = set()
    for info in pkgutil.iter_modules(absorption.__path__, f"{absorption.__name__}."):
        module = importlib.import_module(info.name)
        if getattr(module, "get_alpha_tokens", None) is vocab.get_alpha_tokens and module is not vocab:
            readers.add(info.name)
    assert readers == set(evaluate_lib.ALPHABETIC_TOKEN_READERS)

    seen = []

    def records(*args):
        seen.append(common.get_alpha_tokens is not vocab.get_alpha_tokens)
        raise evaluate_lib.NotApplicable("recorded")

    monkeypatch.setattr(evaluate_lib, "absorption_prompt_tokens", lambda model, config: 0)
    monkeypatch.setattr(evaluate_lib, "prepared_for_saebench", lambda sae, name: sae)
    monkeypatch.setattr(evaluate_lib, "_absorption", records)
    model = SimpleNamespace(cfg=SimpleNamespace(n_ctx=128), tokenizer=SimpleNamespace(padding_side="right"))
    sae = SimpleNamespace(cfg=SimpleNamespace(metadata=SimpleNamespace(hook_name="blocks.0.hook_resid_post")))
    with pytest.raises(evaluate_lib.NotApplicable):
        evaluate_lib.run_absorption(model, sae, SimpleNamespace(model_name="m"), Path("unused"))
    assert seen == [True] and common.get_alpha_tokens is vocab.get_alpha_tokens


def test_split_latent_counts_under_resampled_test_words_are_saebenchs_own():
    """Absorption's count of split latents per letter, recomputed under weights on the k-sparse probes' test words, is
    what SAEBench's own `build_metrics_df` and `add_feature_splits_to_metrics_df` give on the resampled words; its
    bootstrap over those words gives mean_num_split_features an error, and none where the full sample does not
    reproduce SAEBench's counts."""
    from sae_bench.evals.absorption.k_sparse_probing import add_feature_splits_to_metrics_df, build_metrics_df
    from sae_bench.evals.absorption.vocab import LETTERS

    from saecomp.evaluate import split_feature_counts, split_features_uncertainty

    scores, metadata = k_sparse_probe_scores(max_k=4)
    letters, n = list(LETTERS), len(scores)

    def saebench(rows) -> list[int]:
        frame = build_metrics_df(scores.iloc[rows].reset_index(drop=True), metadata, max_k_value=4)
        add_feature_splits_to_metrics_df(frame, max_k_value=4, f1_jump_threshold=0.03)
        return [len(frame.loc[frame["letter"] == letter, "split_feats"].iloc[0]) for letter in letters]

    picks = torch.randint(n, (2, n), generator=torch.Generator().manual_seed(3))  # (SAEBench's scoring: 4 s a sample)
    weights = torch.zeros(3, n, dtype=torch.float64)
    weights[0] = 1  # the full sample
    weights[1:].scatter_add_(1, picks, torch.ones(2, n, dtype=torch.float64))
    ours = split_feature_counts(scores, letters, 4, 0.03, weights)
    full = saebench(list(range(n)))
    assert ours[0].tolist() == full and len(set(full)) > 1  # some letters split more than others
    for r in range(2):
        resampled = saebench(picks[r].tolist())
        assert ours[r + 1].tolist() == resampled and resampled != full, r  # a resample moves some letter's count

    found = split_features_uncertainty(scores, dict(zip(letters, full, strict=True)), 4, 0.03, replicates=200, seed=5)
    assert found["se"]["mean_num_split_features"] > 0 and "inconsistent" not in found
    # the error is the spread over the replicates of the mean over letters, each replicate one draw of the test words
    draws = torch.randint(n, (200, n), generator=torch.Generator().manual_seed(5))
    weights = torch.zeros(200, n, dtype=torch.float64).scatter_add_(1, draws, torch.ones(200, n, dtype=torch.float64))
    means = split_feature_counts(scores, letters, 4, 0.03, weights).double().mean(1)
    assert found["se"]["mean_num_split_features"] == pytest.approx(float(means.std()), rel=1e-12)
    wrong = split_features_uncertainty(scores, {**dict(zip(letters, full, strict=True)), "b": full[1] + 1}, 4, 0.03, replicates=20)
    assert wrong["se"] == {} and wrong["inconsistent"] == {"b": (full[1], full[1] + 1)}
