"""The anti-distillation study: the binary end to end with --quick, config and flag errors, the
trial grid, the analysis (intervals of differences from the saved predictions) and the
component statistics."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import app, flags

from jaxrepro import files, losses, metrics, plots, randomness, study
from jaxrepro.studies import anti_distillation as ad
from jaxrepro.studies import anti_distillation_report as report
from jaxrepro.studies import render, stats
from jaxrepro.studies.anti_distillation import AntiDistillationConfig

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRIALS = ["synthetic/single", "synthetic/ensemble-K2/plain", "synthetic/ensemble-K2/ad-1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, binary_body):
    """The binary's --quick run, in this process (later tests share its compilations;
    tests/test_experiments.py runs the binary files themselves): (workdir, output)."""
    workdir = tmp_path_factory.mktemp("ad") / "run"
    proc = binary_body(AntiDistillationConfig, ["--quick", f"--workdir={workdir}"])
    return workdir, proc


@pytest.mark.slow
def test_binary_quick_end_to_end(quick_run):
    workdir, proc = quick_run
    results = json.loads((workdir / "results.json").read_text())
    config = AntiDistillationConfig.quick()
    assert results["study"] == "anti_distillation" and results["complete"] is True
    assert results["config"] == config.to_dict()
    assert list(results["results"]) == QUICK_TRIALS
    config = AntiDistillationConfig.from_dict(results["config"])
    assert results["summary"] == files.to_json(ad.summarise(config, results["results"]))
    for name, rec in results["results"].items():
        assert rec["diverged"] == [], name
        m = rec["metrics"]
        for key in ("acc_mean", "churn", "pd_abs", "pd_rel"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key)
            lo, hi = m[key + "_ci"]
            assert lo <= hi, (name, key)
        assert m["ci_num_samples"] == config.num_samples
    single = results["results"]["synthetic/single"]
    assert single["info"]["replicas"] == config.replicas * max(config.ks)
    assert single["metrics"]["num_replicas"] == config.replicas * max(config.ks)
    assert [row["k"] for row in single["ensemble_curve"]] == [1, 2]
    assert single["ensemble_curve"][1]["num_groups"] == config.replicas
    assert all("pd_abs_ci" in row for row in single["ensemble_curve"])
    ad_rec = results["results"]["synthetic/ensemble-K2/ad-1"]
    assert ad_rec["info"]["kind"] == "anti_distillation"
    assert ad_rec["info"]["K"] == 2 and ad_rec["info"]["lambda"] == 1.0
    assert ad_rec["metrics"]["num_replicas"] == config.replicas
    for split in ("train", "test"):
        comp = ad_rec["components"][split]
        assert -1.0 <= comp["corr_logits"] <= 1.0
        assert len(comp["corr_logits_replicas"]) == config.replicas
    diffs = ad_rec["differences"]
    assert set(diffs) == {"vs_plain", "vs_independent"}
    assert diffs["vs_plain"]["paired"] is True and diffs["vs_independent"]["paired"] is False
    assert diffs["vs_plain"]["num_replicas"] == [config.replicas, config.replicas]
    plain = results["results"]["synthetic/ensemble-K2/plain"]
    assert set(plain["differences"]) == {"vs_independent"}
    for key in ("acc_mean", "churn", "pd_abs", "pd_rel"):
        d = diffs["vs_plain"][key]  # no replica excluded: the points are the trials' metrics
        assert d["a"] == pytest.approx(ad_rec["metrics"][key], abs=1e-6)
        assert d["b"] == pytest.approx(plain["metrics"][key], abs=1e-6)
        assert d["ci"][0] <= d["ci"][1]
    assert not any("pairs" in rec for rec in results["results"].values())
    # Holm: vs_plain is a family of one (p_holm = p); vs_independent one of two (plain, ad-1).
    for key in ("acc_mean", "churn", "pd_abs", "pd_rel"):
        assert diffs["vs_plain"][key]["p_holm"] == diffs["vs_plain"][key]["p_value"]
        lo, hi = sorted(
            (plain["differences"]["vs_independent"][key], diffs["vs_independent"][key]),
            key=lambda e: e["p_value"],
        )
        assert lo["p_holm"] == pytest.approx(min(1.0, 2 * lo["p_value"]), rel=1e-12)
        assert hi["p_holm"] == pytest.approx(min(1.0, max(2 * lo["p_value"], hi["p_value"])))
    report = (workdir / "report.md").read_text()
    assert report.startswith("# Anti-distillation")
    assert "## Findings" in report and "Overall:" in report and "bootstrap" in report
    # One (dataset, K) group: a pooled difference but no interval, hence no overall verdict.
    assert "in 1 (dataset, K) groups" in report
    assert "no interval (groups: 1; it needs 6): no verdict" in report
    assert "| trial | K | lambda / alpha | acc_mean | churn | pd_abs | pd_rel |" in report
    assert "| trial | K | lambda / alpha | acc_mean" in proc.stdout
    pngs = ["synthetic_lambda.png", "synthetic_k.png", "component_correlation.png"]
    for png in pngs:
        assert plots.is_png(workdir / png), png
        assert f"]({png})" in report
    assert "config 2/2 synthetic/ensemble-K2 epoch 2/2" in proc.stderr  # one sweep per K
    assert not [p for p in workdir.rglob("*.tmp")]


@pytest.mark.slow
def test_report_is_deterministic_and_reads_back(quick_run, tmp_path):
    """The report recomputed from results.json gives the same markdown (the intervals of
    differences are seeded); a rerun in the same workdir trains nothing and keeps
    results.json byte for byte."""
    workdir, _ = quick_run
    before = (workdir / "results.json").read_bytes()
    config = AntiDistillationConfig.quick()
    analysis = study.Analysis(records=json.loads(before)["results"])
    first = report.render(config, analysis, tmp_path)
    assert report.render(config, analysis, tmp_path) == first
    out = study.run(config, workdir, progress=False, portable=True)  # as the binary ran
    assert (workdir / "results.json").read_bytes() == before
    assert "\n".join(first) in out["report_markdown"]
    # The analysis alone, from the saved predictions, gives the same records.
    preds = {n: study.load_predictions(workdir, n) for n in study.record_infos(ad.trials(config))}
    again = study.to_json(dict(ad.analyse(config, preds).records))
    assert again == json.loads(before)["results"]


@pytest.mark.slow
def test_report_with_codistillation_and_more_lambdas(quick_run, tmp_path):
    """The analysis and report's codistillation and multi-lambda paths, on the quick run's saved
    predictions (no training): a codistilled trial and a second lambda whose predictions are
    the plain ensemble's."""
    import dataclasses

    workdir, _ = quick_run
    config = AntiDistillationConfig.quick(codistillation_alpha=0.5, lambdas=(1.0, 2.0))
    saved = {
        n: study.load_predictions(workdir, n)
        for n in study.record_infos(ad.trials(AntiDistillationConfig.quick()))
    }
    plain = saved["synthetic/ensemble-K2/plain"]
    preds = {
        n: saved.get(n) or dataclasses.replace(plain, info=info)
        for n, info in study.record_infos(ad.trials(config)).items()
    }
    analysis = ad.analyse(config, preds)
    lines = "\n".join(report.render(config, analysis, tmp_path))
    assert "Codistillation (codistill-0.5): pd_abs" in lines
    assert "not distinguishable from plain (0.0000 [0.0000, 0.0000], p Holm 1.000)" in lines
    assert "| K=2 ad-2 | 0.0000 [0.0000, 0.0000] |" in lines
    assert "Overall: 2 anti-distilled ensembles (dataset x K x lambda) in 1" in lines
    # Holm families: ad-1, ad-2 and codistill-0.5 against plain; those and plain against the
    # independent ensembles.
    entries = [r["differences"] for r in analysis.records.values() if "differences" in r]
    assert sum("vs_plain" in e for e in entries) == 3
    assert sum("vs_independent" in e for e in entries) == 4
    assert "Holm-adjusted over the 3 comparisons against plain ensembles" in lines
    assert plots.is_png(tmp_path / "synthetic_lambda.png")


# --- configs and flags --------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(replicas=1), "replicas"),
        (dict(datasets=("mnist1d", "cifar")), "datasets"),
        (dict(datasets=("mnist1d", "mnist1d")), "datasets"),
        (dict(ks=(1, 2)), "ks"),
        (dict(ks=(2, 2)), "ks"),
        (dict(lambdas=(0.1, -1.0)), "lambdas"),
        (dict(lambdas=(math.nan,)), "lambdas"),
        (dict(lambdas=()), "lambdas"),
        (dict(codistillation_alpha=-0.5), "codistillation_alpha"),
        (dict(ad_output="probs"), "ad_output"),
        (dict(ad_penalty="cubic"), "ad_penalty"),
        (dict(over="batch"), "over"),
        (dict(vary=("init", "weather")), "vary"),
        (dict(vary=()), "vary"),
        (dict(widths=(64, 0)), "widths"),
        (dict(activation="softmaxx"), "activation"),
        (dict(level=1.5), "level"),
        (dict(num_samples=0), "num_samples"),
        (dict(synthetic_teacher="cubic"), "synthetic_teacher"),
        (dict(synthetic_dim=0), "synthetic_dim"),
        (dict(synthetic_temperature=-1.0), "synthetic_temperature"),
        (dict(num_train=64, batch_size=128), "batch_size"),
        (dict(learning_rate=0.0), "learning_rate"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(study.ConfigError) as e:
        AntiDistillationConfig(**changes)
    assert e.value.fields == (field,)
    assert f"--{field}" in e.value.as_flags()


def test_config_round_trips_and_is_registered():
    for config in (AntiDistillationConfig(), AntiDistillationConfig.quick()):
        assert AntiDistillationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert study.CONFIGS["anti_distillation"] is AntiDistillationConfig


def _main_in_process(argv):
    fv = flags.FlagValues()
    study.define_flags(AntiDistillationConfig, fv)
    fv(["prog", *argv])
    return study.main(AntiDistillationConfig, ["prog"], flag_values=fv)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--lambdas=0.1,oops"], "--lambdas"),
        (["--ks=2,1"], "--ks"),
        (["--ad_output=probs"], "--ad_output"),
        (["--datasets=synthetic,cifar"], "--datasets"),
    ],
)
def test_bad_flags_are_usage_errors_before_training(tmp_path, argv, flag):
    with pytest.raises(app.UsageError, match=flag):
        _main_in_process(["--quick", f"--workdir={tmp_path}", *argv])
    assert not (tmp_path / "config.json").exists()


def test_flags_give_the_config():
    fv = flags.FlagValues()
    study.define_flags(AntiDistillationConfig, fv)
    fv(["prog", "--quick", "--lambdas=0.01,0.1", "--ks=2,4", "--over=components"])
    config = study.config_from_flags(AntiDistillationConfig, fv)
    assert config == AntiDistillationConfig.quick(lambdas=(0.01, 0.1), ks=(2, 4), over="components")


# --- the trial grid -------------------------------------------------------------------------


def test_default_trials_names_info_and_shared_objects():
    config = AntiDistillationConfig()
    trials = ad.trials(config)
    infos = study.record_infos(trials)
    per_k = ["plain", "ad-0.01", "ad-0.1", "ad-1", "ad-10", "ad-100", "codistill-1"]
    assert list(infos) == [
        f"{d}/{v}"
        for d in ("mnist1d", "synthetic")
        for v in ["single"] + [f"ensemble-K{k}/{p}" for k in (2, 4) for p in per_k]
    ]
    # One fit per dataset and K: the seven arms are one sweep of the loss weights.
    assert [t.name for t in trials] == [
        f"{d}/{v}"
        for d in ("mnist1d", "synthetic")
        for v in ("single", "ensemble-K2", "ensemble-K4")
    ]
    by_name = {t.name: t for t in trials}
    single = by_name["mnist1d/single"]
    assert single.fit.replica_ids.tolist() == list(range(16 * 4))
    assert single.task.num_components is None
    t = by_name["mnist1d/ensemble-K4"]
    assert infos["mnist1d/ensemble-K4/ad-0.1"] == {
        "dataset": "mnist1d",
        "num_train": 4000,
        "num_test": 1000,
        "vary": ["init", "order"],
        "kind": "anti_distillation",
        "K": 4,
        "lambda": 0.1,
        "alpha": None,
        "replicas": 16,
    }
    assert t.task.num_components == 4
    # Replica r of every arm has the same keys: ids 0..15 once per arm.
    assert t.fit.replica_ids.tolist() == list(range(16)) * len(per_k)
    part = {p.name: p for p in t.parts}["mnist1d/ensemble-K4/ad-0.1"]
    assert (part.start, part.stop) == (32, 48)
    assert t.task.loss_fn == losses.codistillation(
        losses.anti_distillation(losses.softmax_cross_entropy(), 0.0), 0.0
    )
    lam, alpha = t.hparams["anti_distillation"], t.hparams["codistillation"]
    assert set(lam[part.start : part.stop]) == {0.1}
    assert set(alpha[part.start : part.stop]) == {0.0}
    assert set(lam[:16]) == set(alpha[:16]) == {0.0}  # plain
    assert set(lam[-16:]) == {0.0} and set(alpha[-16:]) == {1.0}  # codistill-1
    assert len({id(t.task.tx) for t in trials}) == 1
    synth = by_name["synthetic/single"].data
    assert (synth.num_train, synth.num_test, synth.num_classes) == (4000, 1000, 2)


def test_codistillation_trials_only_when_alpha_is_positive():
    names = list(
        study.record_infos(ad.trials(AntiDistillationConfig.quick(codistillation_alpha=0.5)))
    )
    assert names == QUICK_TRIALS + ["synthetic/ensemble-K2/codistill-0.5"]
    assert list(study.record_infos(ad.trials(AntiDistillationConfig.quick()))) == QUICK_TRIALS
    sweep = ad.trials(AntiDistillationConfig.quick())[1]
    assert losses.weights(sweep.task.loss_fn) == {"anti_distillation": 0.0}


# --- statistics -----------------------------------------------------------------------------


def _probs(key, r, n, c):
    return np.asarray(jax.random.dirichlet(jax.random.key(key), np.ones(c) * 0.7, (r, n)))


def test_analysis_pairs_replicas_and_skips_diverged_ones():
    """The analysis on hand-made predictions: an ad arm whose replicas agree more than the
    plain ensemble's is 'lower', paired on the replicas finite in both arms."""
    config = AntiDistillationConfig.quick()
    labels = (np.arange(128) % 2).astype(np.int32)  # the quick run's shapes: shared compiles
    info = study.record_infos(ad.trials(config))

    def pred(name, probs):
        r = probs.shape[0]
        return study.Predictions(
            info=info[name],
            probs=probs.astype(np.float32),
            labels=labels,
            replica_ids=np.arange(r),
            keep=np.isfinite(probs).all(axis=(1, 2)),
            train_loss=np.zeros(r, np.float32),
            train_accuracy=np.zeros(r, np.float32),
        )

    plain = _probs(1, 4, 128, 2)
    closer = 0.3 * plain + 0.7 * plain.mean(axis=0, keepdims=True)
    closer[2] = np.nan  # replica 2 of the ad arm diverged
    preds = {
        "synthetic/single": pred("synthetic/single", _probs(2, 8, 128, 2)),
        "synthetic/ensemble-K2/plain": pred("synthetic/ensemble-K2/plain", plain),
        "synthetic/ensemble-K2/ad-1": pred("synthetic/ensemble-K2/ad-1", closer),
    }
    records = ad.analyse(config, preds).records
    rec = records["synthetic/ensemble-K2/ad-1"]
    assert rec["diverged"] == [2] and rec["metrics"]["num_replicas"] == 3
    d = rec["differences"]["vs_plain"]
    assert d["num_replicas"] == [3, 3] and d["num_excluded"] == [1, 1]
    ref = metrics.compare(plain, labels, mask=np.array([True, True, False, True]))
    assert d["pd_abs"]["b"] == pytest.approx(ref["pd_abs"], abs=1e-6)
    assert d["pd_abs"]["ci"][1] < 0 and render.verdict(d["pd_abs"]["ci"]) == "lower"
    # The independent ensembles of k = 2: 4 groups of the single model's 8 replicas, unpaired.
    assert rec["differences"]["vs_independent"]["num_replicas"] == [3, 4]
    assert [row["k"] for row in records["synthetic/single"]["ensemble_curve"]] == [1, 2]


def _ad_records(config, diffs, p_holm):
    """Records with just what ``summarise`` reads: every ensemble trial's ``differences``
    (pd_abs gets ``diffs[name]``, the other metrics 0), with Holm-adjusted p-values."""
    records = {}
    for dataset in config.datasets:
        records[ad.single_name(dataset)] = {"info": {}}
        for k in config.ks:
            for variant, kind, _ in ad.variants(config):
                name = ad.ensemble_name(dataset, k, variant)
                sides = ("vs_independent",) if kind == "plain" else ad.COMPARISONS
                records[name] = {
                    "differences": {
                        side: {
                            m: {
                                "diff": diffs.get(name, 0.0) if m == "pd_abs" else 0.0,
                                "p_value": 0.5,
                                "p_holm": p_holm.get(name, 1.0) if m == "pd_abs" else 1.0,
                            }
                            for m in ad.REPORT_METRICS
                        }
                        for side in sides
                    }
                }
    return records


def test_overall_verdict_rests_on_the_pooled_interval():
    """Six (dataset, K) groups of two lambdas: the pooled difference against the plain
    ensemble, with groups resampled whole, decides the overall line; a last-bit change that
    moves one trial across the Holm threshold changes a count, not the verdict."""
    config = AntiDistillationConfig.quick(
        datasets=("mnist1d", "synthetic"), ks=(2, 4, 8), lambdas=(0.1, 1.0)
    )
    names, groups = [], []
    for dataset in config.datasets:
        for k in config.ks:
            for variant in ("ad-0.1", "ad-1"):
                names.append(ad.ensemble_name(dataset, k, variant))
                groups.append(f"{dataset}/K{k}")
    values = [
        -0.01,
        -0.02,
        -0.015,
        -0.005,
        -0.02,
        0.002,
        -0.01,
        -0.012,
        -0.03,
        -0.01,
        -0.008,
        0.001,
    ]
    diffs = dict(zip(names, values, strict=True))
    edge = names[3]
    before = ad.summarise(config, _ad_records(config, diffs, {edge: 0.049}))
    nudged = dict(diffs, **{edge: float(np.nextafter(diffs[edge], 0.0))})
    after = ad.summarise(config, _ad_records(config, nudged, {edge: 0.051}))
    key = randomness.bootstrap_key(config.seed, stats.POOLED_STREAM)
    want = stats.pooled_difference(
        values, groups, key, num_samples=config.num_samples, level=config.level
    )
    assert {k: before["vs_plain"]["pd_abs"][k] for k in want} == want
    assert want["num_clusters"] == 6 and want["ci"][1] < 0
    assert before["vs_plain"]["pd_abs"]["verdicts"]["lower"] == 1
    assert after["vs_plain"]["pd_abs"]["verdicts"]["lower"] == 0
    assert before["family"] == {"vs_plain": 12, "vs_independent": 18}
    lines = [report._overall(config, s) for s in (before, after)]
    text = render.pooled_text(want, unit="groups")
    assert f"pd_abs minus the plain ensemble of the same K: {text}" in lines[0]
    assert text.endswith(": lower")
    assert lines[0].split(". Criterion")[0] == lines[1].split(". Criterion")[0]
    assert "After Holm's correction, 1 have a pd_abs lower" in lines[0]
    assert "After Holm's correction, 0 have a pd_abs lower" in lines[1]


def test_component_stats():
    key = jax.random.key(3)
    base = np.asarray(jax.random.normal(key, (1, 1, 40, 3)))
    labels = np.arange(40) % 3
    identical = np.broadcast_to(base, (2, 3, 40, 3))
    s = metrics.component_stats(identical, labels)
    assert s["corr_logits"] == pytest.approx(1.0, abs=1e-4)
    assert s["disagreement"] == 0.0
    independent = np.asarray(jax.random.normal(key, (2, 3, 40, 3)))
    s = metrics.component_stats(independent, labels)
    assert abs(s["corr_logits"]) < 0.3 and s["disagreement"] > 0.2
    assert len(s["corr_residual_replicas"]) == 2
