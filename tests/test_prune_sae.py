"""prune_sae: the SAE pruning methods keep their promises, the cached sweep measures what the model would."""

from __future__ import annotations

import mlflow
import pytest
import torch
from click.testing import CliRunner
from sae_lens import SAE, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig

from entrypoints import prune_sae as prune_sae_step
from saecomp.models import load_model
from saecomp.prune_sae import (
    cache_activations,
    kept_latents,
    prune_sae,
    sae_statistics,
    select_level,
    sweep,
)
from saecomp.saes import evaluate_sae


def random_sae(kind: str = "standard", d_in: int = 32, d_sae: int = 128, hook: str = "blocks.1.hook_resid_post") -> SAE:
    cfg = {"standard": StandardSAEConfig, "jumprelu": JumpReLUSAEConfig, "topk": TopKSAEConfig}[kind]
    extra = {"k": 8} if kind == "topk" else {}
    sae = SAE.from_dict(cfg(d_in=d_in, d_sae=d_sae, **extra).to_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if name.startswith("b") else 1.0))
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)
    sae.cfg.metadata.hook_name = hook
    return sae


def activations(n=512, d_in=32, seed=1):
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
    return x * torch.linspace(0.2, 5.0, d_in)  # uneven input norms


@pytest.mark.parametrize("method", ["wanda", "magnitude", "wanda-seed"])
@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk"])
def test_exact_zeros_and_untouched_biases(method, kind):
    sae = random_sae(kind)
    stats = sae_statistics(sae, activations())
    pruned = prune_sae(sae, stats, 0.3, method)
    if method == "wanda":
        # W_enc [d_in, d_sae]: a group is a latent (column); W_dec [d_sae, d_in]: a group is an output dim.
        assert torch.all((pruned.W_enc == 0).sum(0) == int(32 * 0.3))
        assert torch.all((pruned.W_dec == 0).sum(0) == int(128 * 0.3))
    elif method == "wanda-seed":  # within input rows
        assert torch.all((pruned.W_enc == 0).sum(1) == int(128 * 0.3))
        assert torch.all((pruned.W_dec == 0).sum(1) == int(32 * 0.3))
    else:
        assert int((pruned.W_enc == 0).sum()) == int(pruned.W_enc.numel() * 0.3)
    for name, value in sae.state_dict().items():
        if name not in ("W_enc", "W_dec") and kind != "topk":
            assert torch.equal(pruned.state_dict()[name], value), name
    assert torch.equal(sae.W_enc, random_sae(kind).W_enc), "the source SAE was modified"


@pytest.mark.parametrize(
    "kind, extra",
    [("topk", {"reshape_activations": "hook_z"}), ("jumprelu", {"normalize_activations": "layer_norm"}),
     ("standard", {"normalize_activations": "constant_norm_rescale"})],
)  # fmt: skip
def test_pruned_copies_run_alone_and_leave_the_source_as_it_was(kind, extra, tmp_path):
    """SAELens builds each SAE with functions bound to it (hook_z reshaping, input normalisation): a pruned copy must get
    its own, run on its own, and write nothing into the SAE it was copied from, also when the statistics came from
    another object (as when they are loaded, not computed from this one)."""
    cfg = {"standard": StandardSAEConfig, "jumprelu": JumpReLUSAEConfig, "topk": TopKSAEConfig}[kind]
    hook_z = extra.get("reshape_activations") == "hook_z"
    source = SAE.from_dict(cfg(d_in=32, d_sae=128, **({"k": 8} if kind == "topk" else {}), **extra).to_dict())
    source.cfg.metadata.hook_name = "blocks.1.attn.hook_z" if hook_z else "blocks.1.hook_resid_post"
    source.save_model(str(tmp_path / "sae"))
    other = SAE.load_from_disk(str(tmp_path / "sae"))  # the statistics' SAE: the same weights, another object
    x = activations().reshape(-1, 4, 8) if hook_z else activations()  # hook_z: [tokens, heads, d_head]
    stats = sae_statistics(other, x)
    attributes = dict(vars(source))
    weights = {name: value.clone() for name, value in source.state_dict().items()}
    pruned = prune_sae(source, stats, 0.5, "wanda")
    with torch.no_grad():
        out = pruned(x)
    assert torch.isfinite(out).all()
    assert vars(source).keys() == attributes.keys()  # nothing (d_head, ln_mu, ...) set on the source
    assert all(torch.equal(source.state_dict()[name], value) for name, value in weights.items())
    assert pruned.cfg.device == str(source.device) and pruned.W_enc.dtype == source.W_enc.dtype


def test_wanda_scores_by_the_true_inputs():
    sae = random_sae("standard")
    x = activations()
    pruned = prune_sae(sae, sae_statistics(sae, x), 0.5, "wanda")
    # Independent reference: input of W_enc is x - b_dec; input of W_dec is the latent activations.
    with torch.no_grad():
        enc_norm = (x - sae.b_dec).double().norm(dim=0)
        dec_norm = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).double().norm(dim=0)
        enc_score = sae.W_enc.abs().double() * enc_norm[:, None]
        dec_score = sae.W_dec.abs().double() * dec_norm[:, None]
    for score, weight in ((enc_score, pruned.W_enc), (dec_score, pruned.W_dec)):
        k = score.shape[0] // 2
        expected = torch.zeros_like(score, dtype=torch.bool).scatter_(0, score.argsort(dim=0, stable=True)[:k], True)
        assert torch.equal(weight == 0, expected)


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk"])
def test_sparsity_zero_is_the_same_sae(kind):
    sae = random_sae(kind)
    x = activations()
    same = prune_sae(sae, sae_statistics(sae, x), 0.0, "wanda")
    assert torch.allclose(same(x), sae(x), atol=1e-5)
    if kind != "topk":
        assert all(torch.equal(same.state_dict()[k], v) for k, v in sae.state_dict().items())


def test_topk_with_decoder_norm_rescaling_never_divides_by_zero():
    sae = random_sae("topk")
    sae.cfg.rescale_acts_by_decoder_norm = True
    x = activations()
    before = sae(x)
    pruned = prune_sae(sae, sae_statistics(sae, x), 0.99, "wanda")
    assert torch.isfinite(pruned(x)).all()
    assert torch.allclose(prune_sae(sae, sae_statistics(sae, x), 0.0, "wanda")(x), before, atol=1e-4)


@pytest.mark.parametrize("kind,d_sae", [("standard", 128), ("jumprelu", 128), ("jumprelu", 32)])  # 32: as wide as its input
def test_latents_makes_a_smaller_sae_that_reconstructs_like_the_masked_original(kind, d_sae, tmp_path):
    """Latents dropped by name: b_dec ([d_in]) stays whole even where d_in == d_sae (it was cut as a per-latent vector)."""
    sae = random_sae(kind, d_sae=d_sae)
    x = activations()
    stats = sae_statistics(sae, x)
    smaller = prune_sae(sae, stats, 0.75, "latents")
    assert smaller.cfg.d_sae == d_sae - int(d_sae * 0.75) and torch.equal(smaller.b_dec, sae.b_dec)
    smaller.save_model(str(tmp_path / "small"))
    loaded = SAE.load_from_disk(str(tmp_path / "small"))
    masked = random_sae(kind, d_sae=d_sae)
    dropped = torch.ones(d_sae, dtype=torch.bool)
    dropped[kept_latents(sae, stats, 0.75)] = False
    with torch.no_grad():
        masked.W_dec[dropped] = 0
    assert torch.allclose(loaded(x), masked(x), atol=1e-5)
    # The kept latents are the most used ones.
    frequency = stats.fire_count.double()
    assert frequency[~dropped].mean() >= frequency[dropped].mean()


def test_selection_rule_mse_is_relative_to_the_trained_sae():
    metrics = {0.25: {"mse": 1.0}, 0.5: {"mse": 1.04}, 0.9: {"mse": 1.2}, 0.1: {"mse": 0.5}}
    trained = {"mse": 1.0, "ce_loss_without_sae": 2.0}
    assert select_level(metrics, trained, tolerance=0.05, metric="mse") == (0.5, True)
    assert select_level(metrics, trained, tolerance=0.25, metric="mse") == (0.9, True)
    assert select_level(metrics, {**trained, "mse": 0.5}, tolerance=0.05, metric="mse") == (0.25, False)
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        select_level(metrics, trained, -0.1, "mse")


def test_selection_stops_at_the_first_failing_level():
    # 0.6 fails; 0.7 passes again (noise): the rule must not jump over the failure.
    metrics = {0.25: {"mse": 1.0}, 0.5: {"mse": 1.01}, 0.6: {"mse": 1.5}, 0.7: {"mse": 1.02}}
    assert select_level(metrics, {"mse": 1.0, "ce_loss_without_sae": 2.0}, 0.05, "mse") == (0.5, True)


@pytest.mark.parametrize("trained_increase", [0.0, -0.002])
def test_selection_on_ce_works_when_the_trained_sae_costs_nothing(trained_increase):
    # A relative tolerance on an increase of ~0 (or < 0) would accept nothing; the margin is tol x clean CE.
    clean = 2.0
    trained = {"ce_loss_without_sae": clean, "ce_loss_increase": trained_increase, "ce_loss_with_sae": clean + trained_increase}
    increases = {0.25: 0.001, 0.5: 0.004, 0.75: 0.03}
    metrics = {level: {"ce_loss_increase": d, "ce_loss_with_sae": clean + d} for level, d in increases.items()}
    # tol 0.005 x clean 2.0 = 0.01 nats of margin above the trained SAE
    assert select_level(metrics, trained, 0.005, "ce_loss_increase") == (0.5, True)
    assert select_level(metrics, trained, 0.005, "ce_loss_with_sae") == (0.5, True)
    assert select_level(metrics, trained, 0.0, "ce_loss_increase")[1] is False


def test_argmin_rule_is_the_seed_codes():
    metrics = {0.1: {"ce_loss_with_sae": 1.0}, 0.25: {"ce_loss_with_sae": 2.01}, 0.5: {"ce_loss_with_sae": 2.0},
               0.75: {"ce_loss_with_sae": 2.0}, 0.9: {"ce_loss_with_sae": 2.3}}  # fmt: skip
    # Lowest spliced CE at or above 0.25; a tie goes to the higher level (the seed scans high to low with <).
    assert select_level(metrics, {}, 0.0, "mse", rule="argmin") == (0.75, True)
    # A NaN compares as nothing: first in line, it would have been kept as the minimum
    metrics[0.25]["ce_loss_with_sae"] = float("nan")
    assert select_level(metrics, {}, 0.0, "mse", rule="argmin") == (0.75, True)
    nan_everywhere = {level: {"ce_loss_with_sae": float("nan")} for level in (0.25, 0.5)}
    with pytest.raises(ValueError, match="every level's spliced cross-entropy is NaN"):
        select_level(nan_everywhere, {}, 0.0, "mse", rule="argmin")


def test_a_kept_level_has_a_variant_name_of_its_own():
    """Test-table rows, metrics and pipeline variants are named by level: two kept levels never share a name (0.251
    was 'pruned25', as the paper's Pruned25 is)."""
    from saecomp.names import pruned_variant

    assert [pruned_variant(level) for level in (0.25, 0.5, 0.57, 0.99)] == ["pruned25", "pruned50", "pruned57", "pruned99"]
    assert pruned_variant(0.251) == "pruned25_1" and pruned_variant(0.994) == "pruned99_4" and pruned_variant(0.1 + 0.2) == "pruned30"
    assert pruned_variant(0.25000001) == "pruned25_000001" and pruned_variant(1e-7) == "pruned0_00001"  # digits, no exponent
    assert pruned_variant(0.1234561) != pruned_variant(0.1234564)


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-gemma2"])
def test_cached_sweep_measures_what_the_whole_model_would(small_world, model_name):
    loaded = load_model(model_name, small_world / model_name)
    model = loaded.tl
    tokens = torch.randint(0, 1000, (6, 64), generator=torch.Generator().manual_seed(2))
    bos = loaded.tokenizer.bos_token_id
    tokens[:, 0] = bos  # BOS first, as Gemma's windows are, and an end of text inside
    tokens[1, 30] = loaded.tokenizer.eos_token_id
    special = {bos, loaded.tokenizer.eos_token_id}
    d_z = model.cfg.n_heads * model.cfg.d_head
    for hook, d_in in (("blocks.1.attn.hook_z", d_z), ("blocks.1.hook_mlp_out", 32), ("blocks.0.hook_resid_post", 32)):
        sae = random_sae("standard", d_in=d_in, d_sae=64, hook=hook)
        if hook.endswith("hook_z"):
            sae = SAE.from_dict({**sae.cfg.to_dict(), "reshape_activations": "hook_z"})
            sae.load_state_dict(random_sae("standard", d_in=d_in, d_sae=64, hook=hook).state_dict())
            sae.cfg.metadata.hook_name = hook
        cache = cache_activations(model, hook, tokens, batch_size=4, special_ids=special)
        stats = sae_statistics(sae, cache.ordinary_activations())
        result = sweep(model, sae, stats, cache, [0.0, 0.5])
        for level in (0.0, 0.5):
            full = evaluate_sae(model, result.saes[level], tokens, batch_size=4, special_ids=special)
            for key, value in full.items():
                assert result.metrics[level][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (hook, level, key)
        assert result.metrics[0.5]["mse"] != result.metrics[0.0]["mse"]


def test_prune_sae_step_as_typed(small_experiment):
    result = CliRunner().invoke(prune_sae_step.main, ["--experiment", str(small_experiment), "--sparsity", "0.3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`saecomp.step` = 'prune_sae'")
    run = sorted(runs, key=lambda r: r.info.start_time)[-1]
    assert run.info.status == "FINISHED"
    assert {"sparsity": "0.3", "method": "wanda", "hook": "attn.hook_z"}.items() <= run.data.params.items()
    assert run.data.params["source"].startswith("runs:/") and run.data.params["trained"].startswith("runs:/")
    history = client.get_metric_history(run.info.run_id, "sweep.mse")
    assert sorted(m.step for m in history) == [250, 300, 500, 900]
    selected = run.data.metrics["selected_sparsity"]
    assert selected in (0.25, 0.3, 0.5, 0.9)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"sweep.png", "sweep.csv", "test_table.csv", "saes"} <= names
    kept = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "saes")}
    assert {"pruned-0.25", "pruned-0.3", "pruned-0.5", f"pruned-{selected:g}"} == kept
    prune_run = run.data.params["pruned_model_run"]
    model = load_model("tiny-gpt2", mlflow.artifacts.download_artifacts(run_id=prune_run, artifact_path="pruned_model")).tl
    for folder in kept:
        sae = SAE.load_from_disk(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"saes/{folder}"))
        assert abs(float((sae.W_enc == 0).float().mean()) - float(folder.split("-")[1])) < 0.02
        metrics = evaluate_sae(model, sae, torch.randint(0, 1000, (2, 64)))
        assert metrics["ce_loss_with_sae"] != metrics["ce_loss_without_sae"]
    versions = client.search_model_versions("name = 'small.tiny-gpt2.blocks.1.attn.hook_z'")
    assert {v.tags.get("sparsity") for v in versions if v.tags.get("variant") == "pruned"} >= {"0.25", "0.3", "0.5"}

    # The logged token ids alone rebuild its statistics and masks.
    from safetensors.torch import load_file

    from saecomp.data import SAETokens, special_token_ids
    from saecomp.saes import load_sae

    tokens = SAETokens.from_dict(load_file(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="tokens.safetensors")))
    assert tokens.calibration.shape == (16, 64) and tokens.test.shape == (8, 64)
    pretrained = load_sae(run.data.params["source"])
    loaded = load_model("tiny-gpt2", mlflow.artifacts.download_artifacts(run_id=prune_run, artifact_path="pruned_model"))
    cache = cache_activations(loaded.tl, "blocks.1.attn.hook_z", tokens.calibration, special_ids=special_token_ids(loaded.tokenizer))
    rebuilt = prune_sae(pretrained, sae_statistics(pretrained, cache.ordinary_activations()), 0.25, "wanda")
    logged = SAE.load_from_disk(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="saes/pruned-0.25"))
    assert torch.equal(rebuilt.W_enc == 0, logged.W_enc == 0) and torch.equal(rebuilt.W_dec == 0, logged.W_dec == 0)


def test_latents_drops_levels_of_the_default_sweep_it_cannot_reach(small_experiment, tmp_path):
    """Dropped with a message, and keyed by the sweep asked for, as the pipeline (which knows no SAE yet) looks the step
    up: keyed by the sweep left, the pipeline's `latents` run ended "finished with another key"."""
    from saecomp.config import load_experiment
    from saecomp.names import SAESource

    exp_text = small_experiment.read_text().replace("sparsities: [0.25, 0.5, 0.9]", "sparsities: [0.25, 0.5, 0.99]\n  method: latents")
    assert "method: latents" in exp_text
    (tmp_path / "latents.yaml").write_text(exp_text)
    result = CliRunner().invoke(prune_sae_step.main, ["--experiment", str(tmp_path / "latents.yaml")])
    assert result.exit_code == 0, result.output
    assert "cannot reach 0.99 (fewer latents than k): dropped" in result.output
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`saecomp.step` = 'prune_sae'")
    run = max(runs, key=lambda r: r.info.start_time)
    exp = load_experiment(tmp_path / "latents.yaml")
    p = run.data.params
    pipelines_key = prune_sae_step.key_for(
        exp, str(tmp_path / "latents.yaml"), p["hook"], int(p["layer"]), None, exp.sae_pruning.selection_metric,
        p["pruned_model_run"], SAESource.parse(p["source"]), SAESource.parse(p["trained"]),
    )  # fmt: skip
    assert run.data.tags["saecomp.key"] == pipelines_key


BAD = [
    (["--sparsity", "1.0"], "sparsity=1.0 is not valid; valid: a number in [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity=-0.1 is not valid"),
    (["--sparsities", ","], "sparsities=',' is empty"),
    (["--tolerance", "-1"], "tolerance=-1 is not valid; valid: a number >= 0"),
    (["--layer", "9"], "layer=9 is outside the model; valid: 0..1"),
    (["--hook", "hook_q"], "hook='hook_q' is not valid"),
    (["--method", "random"], "method='random' is not valid; valid: wanda, magnitude, wanda-seed, latents"),
    (["--selection_rule", "best"], "selection_rule='best' is not valid; valid: tolerance, argmin"),
    (["--selection_metric", "kl"], "selection_metric='kl' is not valid; valid: mse, ce_loss_with_sae, ce_loss_increase"),
    # 128 latents, k = 8: 0.99 leaves 2. Found before the sweep's first level, not at its last.
    (["--method", "latents", "--sparsity", "0.99"], "sparsity=0.99 is not valid for method=latents: it leaves 2 of 128 latents"),
    (["--method", "latents", "--sparsities", "0.5,0.95"], "sparsity=0.95 is not valid for method=latents"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_rejected_before_any_run(small_experiment, args, message):
    client = mlflow.MlflowClient()
    count = lambda: len(client.search_runs([e.experiment_id for e in client.search_experiments()]))  # noqa: E731
    before = count()
    result = CliRunner().invoke(prune_sae_step.main, ["--experiment", str(small_experiment), *args])
    assert result.exit_code == 2, result.output
    assert f"saecomp: error: {message}" in result.output
    assert count() == before


@pytest.mark.parametrize("source", ["folder", "runs:/0123456789abcdef0123456789abcdef/sae"])
def test_a_source_that_is_not_an_sae_is_rejected_before_any_run(small_experiment, tmp_path, source):
    if source == "folder":
        (tmp_path / "not-an-sae").mkdir()
        source = str(tmp_path / "not-an-sae")
    client = mlflow.MlflowClient()
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    result = CliRunner().invoke(prune_sae_step.main, ["--experiment", str(small_experiment), "--source", source])
    assert result.exit_code == 2
    assert f"saecomp: error: source='{source}' is not a loadable SAE" in result.output
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


def test_a_source_at_a_hook_the_model_lacks_is_rejected_before_any_run(small_experiment, tmp_path):
    sae = random_sae("standard", hook="blocks.7.hook_resid_post")
    sae.save_model(str(tmp_path / "elsewhere"))
    client = mlflow.MlflowClient()
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    result = CliRunner().invoke(
        prune_sae_step.main, ["--experiment", str(small_experiment), "--hook", "hook_resid_post", "--source", str(tmp_path / "elsewhere")]
    )
    assert result.exit_code == 2
    assert "saecomp: error: source SAE is at blocks.7.hook_resid_post, not blocks.1.hook_resid_post" in result.output
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


def test_a_bad_level_or_method_is_refused_before_the_model_libraries_load(small_experiment):
    """The checks that need no SAE (levels, method, hook) come before SAELens, TransformerLens and torch are imported:
    a typo costs a fraction of a second, not the 5-20 s of their imports (met by a new user under `mlflow run`)."""
    import subprocess
    import sys

    from conftest import ROOT

    script = (
        "import sys\nfrom click.testing import CliRunner\nfrom entrypoints.prune_sae import main\n"
        f"for args in (['--sparsity', '1.5'], ['--method', 'random'], ['--hook', 'hook_q']):\n"
        f"    result = CliRunner().invoke(main, ['--experiment', {str(small_experiment)!r}, *args])\n"
        "    print(result.exit_code, result.output.strip().splitlines()[-1])\n"
        "print(sorted(name for name in ('sae_lens', 'transformer_lens', 'torch') if name in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *refusals, imported = out.stdout.strip().splitlines()
    assert [line.split(" ", 1)[0] for line in refusals] == ["2", "2", "2"], refusals
    assert all("saecomp: error:" in line for line in refusals) and imported == "[]", out.stdout
