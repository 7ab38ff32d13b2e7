"""The anti-distillation study (Shamir & Coviello): does decorrelating an ensemble's components
make replicas of the ensemble agree more than plain ensembling does?

Per dataset the study trains R replicas of each of: ``single``, one MLP trained as
``R * max(ks)`` replicas so that groups of k consecutive replicas are ensembles of k
independently trained models (the reference at equal compute, methods.md section 6);
``ensemble-K{K}/plain``, a K-component ensemble (``models.Ensemble``) trained with the task
loss of its prediction (``over``); ``ensemble-K{K}/ad-{lambda}``, the same plus lambda times
the decorrelation penalty (``losses.anti_distillation``); ``ensemble-K{K}/codistill-{alpha}``,
the same plus the codistillation term (``losses.codistillation``, Anil et al. 2018).
The ensemble arms of one (dataset, K) are one fit, a sweep of the loss weights (``_sweep``):
one compilation for all of them, each arm a ``Part`` recorded as its own trial.

``analyse`` records ``metrics.compare`` of every trial with intervals over replicas and, per
ensemble trial, ``differences`` (``metrics.difference``) against the plain ensemble of the same
K (paired: replica r of both shares its keys) and the independent ensembles of k = K
(unpaired). Ensemble trials measure the correlation of their components on the training and
the test set (``metrics.component_stats``): a penalty that decorrelates only on the training
data (Jeffares et al. 2023) shows a test correlation well above the training one.

**Many comparisons.** Each difference's two-sided bootstrap p-value gets Holm's correction
(``stats.holm``, the project's choice) within its family: all ``vs_plain`` comparisons of a
metric (every anti-distilled and codistilled trial), and all ``vs_independent`` comparisons of a
metric; ``p_holm`` sits beside ``p_value``, and the report calls a difference lower or higher
when ``p_holm`` <= 1 - ``level``. **The overall verdict** rests on a pooled effect, not on a
count of significant trials (``summarise``, from the records alone): the mean difference of the
anti-distilled trials (every dataset, K and lambda) against the plain ensemble, and against the
independent ensembles, with a cluster-bootstrap interval (``stats.pooled_difference``) whose
clusters are the (dataset, K) pairs, since the lambdas of one pair share its plain ensemble and
its independent ensembles. With fewer (dataset, K) pairs than ``stats.min_clusters`` there is no
interval and no overall verdict.

References:
  Shamir & Coviello, arXiv 2010.09923; Anil et al. 2018, arXiv 1804.03235; Jeffares et al.
  2023; methods.md sections 6 and 7; Holm 1979.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from jaxrepro import engine, losses, metrics, models, optim, randomness, synthetic
from jaxrepro.studies import stats
from jaxrepro.studies.base import (
    StudyConfig,
    bootstrap_kwargs,
    check_activation,
    check_choice,
    check_choices,
    check_int,
    check_level,
    check_number,
    check_sources,
    check_synthetic,
    check_unique,
    check_widths,
    fit_config,
    flag_field,
    load_dataset,
    require,
)
from jaxrepro.studies.runner import Analysis, Part, Trial, record
from jaxrepro.studies.workdir import Predictions

TITLE = "Anti-distillation: decorrelated ensembles and reproducibility"

AD_DATASETS = ("mnist1d", "synthetic", "digits")
SYNTHETIC_SIZES = (4000, 1000)
"""Training and test examples of the synthetic data when ``num_train`` / ``num_test`` is 0 (the
sizes of MNIST-1D's split)."""

REPORT_METRICS = ("acc_mean", "churn", "pd_abs", "pd_rel")
"""The metrics of the tables, plots and differences."""

COMPARISONS = ("vs_plain", "vs_independent")
"""The differences an ensemble trial records (each its own Holm family per metric)."""


@dataclasses.dataclass(frozen=True)
class AntiDistillationConfig(StudyConfig):
    """Anti-distillation study (Shamir & Coviello): PD of K-component ensembles trained with a
    decorrelation penalty, against plain and codistilled ensembles and against ensembles of k
    independently trained models (methods.md sections 6 and 7)."""

    STUDY: ClassVar[str] = "anti_distillation"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        datasets=("synthetic",),
        replicas=4,
        epochs=2,
        widths=(16,),
        ks=(2,),
        lambdas=(1.0,),
        codistillation_alpha=0.0,
        num_train=256,
        num_test=128,
        num_samples=100,
    )

    replicas: int = flag_field(
        16, "replicas R of each ensemble trial (the single-model trial trains R * max(ks))"
    )
    num_train: int = flag_field(
        0, f"training examples (0: all of mnist1d/digits, {SYNTHETIC_SIZES[0]} synthetic)"
    )
    num_test: int = flag_field(
        0, f"test examples (0: all of mnist1d/digits, {SYNTHETIC_SIZES[1]} synthetic)"
    )
    datasets: tuple[str, ...] = flag_field(
        ("mnist1d", "synthetic"), "datasets: mnist1d, synthetic (jaxrepro.synthetic), digits"
    )
    widths: tuple[int, ...] = flag_field((64, 64), "hidden widths of the MLP (one component)")
    activation: str = flag_field("relu", "activation of the MLP")
    ks: tuple[int, ...] = flag_field((2, 4), "ensemble sizes K (components per replica)")
    lambdas: tuple[float, ...] = flag_field(
        (0.01, 0.1, 1.0, 10.0, 100.0), "anti-distillation weights lambda (the sweep)"
    )
    ad_output: str = flag_field(
        "logits", "output the penalty decorrelates: logits, or residual (softmax - one-hot)"
    )
    ad_penalty: str = flag_field("squared", "penalty on the correlations: squared or absolute")
    codistillation_alpha: float = flag_field(
        1.0, "weight of the codistilled ensemble's term (0: no codistilled ensembles)"
    )
    over: str = flag_field(
        "ensemble",
        "task loss of an ensemble: of the ensemble prediction (ensemble, methods.md "
        "section 7) or the mean of the components' losses (components)",
    )
    vary: tuple[str, ...] = flag_field(("init", "order"), "sources varied between replicas")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    synthetic_dim: int = flag_field(10, "input dimension of the synthetic data")
    synthetic_teacher: str = flag_field("single", "synthetic teacher: linear, single or mlp")
    synthetic_temperature: float = flag_field(0.25, "label temperature of the synthetic data")
    data_seed: int = flag_field(0, "seed of the synthetic data (independent of the replicas')")
    num_samples: int = flag_field(1000, "bootstrap samples of the intervals")
    level: float = flag_field(0.95, "confidence level of the intervals")

    def check(self):
        check_choices("datasets", self.datasets, AD_DATASETS, "dataset")
        check_widths("widths", self.widths)
        check_activation("activation", self.activation)
        check_unique("ks", self.ks)
        for k in self.ks:
            check_int("ks", k, 2, 16)  # components per ensemble
        check_unique("lambdas", self.lambdas)
        for lam in self.lambdas:
            check_number("lambdas", lam, 0.0, strict=True)
        check_number("codistillation_alpha", self.codistillation_alpha)
        check_choice("ad_output", self.ad_output, losses.AD_OUTPUTS)
        check_choice("over", self.over, losses.OVER)
        check_choice("ad_penalty", self.ad_penalty, ("squared", "absolute"))
        check_sources("vary", self.vary)
        require(
            len(self.vary) > 0,
            "vary",
            "must name at least one source (otherwise every replica is identical)",
        )
        require(
            self.num_train == 0 or self.batch_size <= self.num_train,
            "batch_size",
            f"{self.batch_size} is larger than num_train={self.num_train}",
        )
        check_int("num_samples", self.num_samples)
        check_level("level", self.level)
        fields = {
            "dim": "synthetic_dim",
            "teacher": "synthetic_teacher",
            "temperature": "synthetic_temperature",
            "seed": "data_seed",
        }
        check_synthetic(self.synthetic_spec, fields)

    def synthetic_spec(self) -> synthetic.Synthetic:
        """The generator spec of the synthetic dataset (binary labels, tanh teacher)."""
        return synthetic.Synthetic(
            dim=self.synthetic_dim,
            num_train=self.num_train or SYNTHETIC_SIZES[0],
            num_test=self.num_test or SYNTHETIC_SIZES[1],
            teacher=self.synthetic_teacher,
            temperature=self.synthetic_temperature,
            seed=self.data_seed,
        )

    @property
    def single_replicas(self) -> int:
        """Replicas of the single-model trial: ``R * max(ks)``, so ensembles of k consecutive
        replicas give at least R ensembles for every k."""
        return self.replicas * max(self.ks)


def num(v: float) -> str:
    """A weight as it appears in trial names: ``0.1``, ``1``, ``10``."""
    return f"{float(v):g}"


def single_name(dataset: str) -> str:
    return f"{dataset}/single"


def ensemble_name(dataset: str, k: int, variant: str) -> str:
    """``<dataset>/ensemble-K<k>/<variant>``: variant ``plain``, ``ad-<lambda>`` or
    ``codistill-<alpha>``."""
    return f"{dataset}/ensemble-K{k}/{variant}"


def variants(config: AntiDistillationConfig) -> list[tuple[str, str, float]]:
    """(variant name, kind, weight) of the ensemble trials of one K, in report order."""
    out = [("plain", "plain", 0.0)]
    out += [(f"ad-{num(lam)}", "anti_distillation", float(lam)) for lam in config.lambdas]
    if config.codistillation_alpha > 0:
        alpha = float(config.codistillation_alpha)
        out.append((f"codistill-{num(alpha)}", "codistillation", alpha))
    return out


def _loss(config: AntiDistillationConfig, kind: str, weight: float) -> losses.Loss:
    base = losses.softmax_cross_entropy(over=config.over)
    if kind == "anti_distillation":
        return losses.anti_distillation(
            base, weight, output=config.ad_output, penalty=config.ad_penalty
        )
    return losses.codistillation(base, weight) if kind == "codistillation" else base


def trials(config: AntiDistillationConfig) -> list[Trial]:
    tx = optim.optimizer("adam", config.learning_rate)
    vary = randomness.check_sources(config.vary)
    fit = fit_config(config, vary)
    out = []
    for name in config.datasets:
        spec = config.synthetic_spec()
        ds = load_dataset(name, config.num_train, config.num_test, synthetic_spec=spec)
        mlp = models.MLP(
            widths=config.widths, num_classes=ds.num_classes, activation=config.activation
        )
        base = dict(dataset=name, num_train=ds.num_train, num_test=ds.num_test, vary=list(vary))
        single = dataclasses.replace(fit, replicas=config.single_replicas)
        task = engine.Task(model=mlp, tx=tx, loss_fn=losses.softmax_cross_entropy())
        info = dict(
            base,
            kind="single",
            K=1,
            **{"lambda": None},
            alpha=None,
            replicas=config.single_replicas,
        )
        out.append(Trial(single_name(name), task, ds, single, info))
        for k in config.ks:
            out.append(_sweep(config, ds, base, models.Ensemble(mlp, num_components=k), tx, fit))
    return out


def _sweep(config, ds, base: dict, model, tx, fit) -> Trial:
    """Every ensemble arm of one (dataset, K) as one fit: the plain, anti-distilled and
    codistilled ensembles are one loss, ``codistillation(anti_distillation(task loss, lambda),
    alpha)``, whose weights differ per replica (``hparams``; (0, 0) is the plain ensemble, whose
    loss and gradient the zero-weighted terms leave unchanged: they add exact zeros while the
    penalties are finite, which the correlations' eps ensures). One
    compilation trains the whole lambda sweep. Replica r of every arm has the same keys (ids
    0..R-1 repeated), so the arms' paired comparisons pair replicas trained alike."""
    k = model.num_components
    arms = variants(config)
    loss = _loss(config, "anti_distillation", 0.0)
    if config.codistillation_alpha > 0:
        loss = losses.codistillation(loss, 0.0)
    r = config.replicas
    hparams: dict[str, list[float]] = {n: [] for n in losses.weights(loss)}
    parts = []
    for i, (variant, kind, weight) in enumerate(arms):
        for name in hparams:
            hparams[name] += [weight if kind == name else 0.0] * r
        codistill = kind == "codistillation"
        info = dict(
            base,
            kind=kind,
            K=k,
            **{"lambda": None if codistill else weight},
            alpha=weight if codistill else None,
            replicas=r,
        )
        parts.append(Part(ensemble_name(base["dataset"], k, variant), i * r, (i + 1) * r, info))
    return Trial(
        f"{base['dataset']}/ensemble-K{k}",
        engine.Task(model=model, tx=tx, loss_fn=loss),
        ds,
        dataclasses.replace(fit, replicas=tuple(range(r)) * len(arms)),
        dict(base, kind="sweep", K=k),
        measure=measure_components,
        hparams={n: tuple(v) for n, v in hparams.items()},
        parts=tuple(parts),
    )


def measure_components(run: engine.Run, ds, keep: np.ndarray) -> dict[str, Any]:
    """What an ensemble trial measures on its trained replicas: ``metrics.component_stats`` of
    the replicas that stayed finite (``keep``), on the test and training set."""
    ids = np.flatnonzero(keep)
    if len(ids) < 2:
        return {}
    # A sweep measures each arm on its own replicas: the components' logits of the whole run
    # are computed once and kept with the run.
    held = run.__dict__.get("_component_logits")
    if held is None or held[0] is not run.device_state:  # computed for this state only
        held = run.__dict__["_component_logits"] = (run.device_state, {})
    memo = held[1]
    out = {}
    for split, x, y in (("test", ds.x_test, ds.y_test), ("train", ds.x_train, ds.y_train)):
        if split not in memo:
            memo[split] = run.predict(x, logits=True, components=True)
        out[split] = metrics.component_stats(memo[split][ids], y)
    return out


def _group(probs_RxNxC: np.ndarray, k: int) -> np.ndarray:
    """Ensembles of k consecutive replicas (the last R mod k left out): mean probabilities
    ``[R // k, N, C]``, as ``metrics.ensemble``."""
    g = probs_RxNxC.shape[0] // k
    p = np.asarray(probs_RxNxC[: g * k], np.float64).reshape((g, k) + probs_RxNxC.shape[1:])
    return p.mean(axis=1).astype(np.float32)


def _difference(config, a: Predictions, b: Predictions | np.ndarray, *, paired: bool) -> dict:
    kw = bootstrap_kwargs(config, over="replicas")
    if paired:
        out = metrics.difference(a.probs, b.probs, a.labels, mask=a.keep & b.keep, **kw)
    else:
        out = metrics.difference(a.probs, b, a.labels, paired=False, mask=a.keep, **kw)
    return {k: v for k, v in out.items() if not isinstance(v, dict) or k in REPORT_METRICS}


def analyse(config: AntiDistillationConfig, predictions: Mapping[str, Predictions]) -> Analysis:
    """Per trial ``metrics.compare`` with intervals; the single model's ensemble curve; each
    ensemble's components and its differences against the plain ensemble and the independent
    ensembles of k = K."""
    kw = bootstrap_kwargs(config, over="replicas")
    records = {}
    for dataset in config.datasets:
        single = predictions[single_name(dataset)]
        rec = records[single_name(dataset)] = record(single, **kw)
        kept = single.probs[single.keep]
        ks = (1,) + tuple(sorted(config.ks))
        enough = rec["metrics"] is not None and len(kept) // max(ks) >= 2
        if rec["metrics"] is not None and not enough:
            rec["error"] = "too few finite replicas for ensembles of every k"
        groups = {k: _group(kept, k) for k in ks[1:]} if enough else {}
        if enough:
            curve = metrics.ensemble_curve(single.probs, single.labels, ks=ks, mask=single.keep)
            for row in curve:  # k = 1: the trial's own intervals; k > 1: groups as replicas
                res = (
                    rec["metrics"]
                    if row["k"] == 1
                    else metrics.compare(groups[row["k"]], single.labels, **kw)
                )
                row.update({f"{m}_ci": res[f"{m}_ci"] for m in REPORT_METRICS})
            rec["ensemble_curve"] = curve
        for k in config.ks:
            plain = predictions[ensemble_name(dataset, k, "plain")]
            for variant, _, _ in variants(config):
                pred = predictions[ensemble_name(dataset, k, variant)]
                rec = records[ensemble_name(dataset, k, variant)] = record(pred, **kw)
                if rec["metrics"] is None:
                    continue
                rec["components"] = dict(pred.measures)
                diffs = rec["differences"] = {}
                if variant != "plain" and (pred.keep & plain.keep).sum() >= 2:
                    diffs["vs_plain"] = _difference(config, pred, plain, paired=True)
                if enough:
                    diffs["vs_independent"] = _difference(config, pred, groups[k], paired=False)
    for side in COMPARISONS:
        entries = [
            r["differences"][side] for r in records.values() if side in r.get("differences", {})
        ]
        for metric in REPORT_METRICS:
            adjusted = stats.holm([e[metric]["p_value"] for e in entries])
            for entry, p in zip(entries, adjusted, strict=True):
                entry[metric]["p_holm"] = float(p)
    order = list(predictions)
    return Analysis(records={name: records[name] for name in order})


def summarise(config: AntiDistillationConfig, records: Mapping[str, Mapping[str, Any]]) -> dict:
    """The overall verdict's numbers, from the records alone (as saved in results.json).

    For each of ``COMPARISONS`` and each metric of ``REPORT_METRICS``, over the anti-distilled
    trials (every dataset, K and lambda) that have that difference: ``stats.pooled_difference``
    of their differences with (dataset, K) clusters, and the count of each Holm verdict
    (``stats.holm_verdict``: lower, higher, no difference, undefined). ``lower_clean``: trials
    whose pd_abs is lower than the plain ensemble's while their churn is not higher and their
    accuracy not lower (after Holm). Draws: ``fold_in(bootstrap_key(seed),
    stats.POOLED_STREAM)``. Also ``alpha`` (1 - level), ``min_clusters``, ``min_p`` (the
    smallest bootstrap p-value, 2 / (num_samples + 1)) and ``family`` (the Holm family size of
    each comparison)."""
    alpha = 1 - config.level
    key = randomness.bootstrap_key(config.seed, stats.POOLED_STREAM)
    kw = dict(num_samples=config.num_samples, level=config.level)
    out: dict[str, Any] = {}
    for side in COMPARISONS:
        entries, clusters = [], []
        for dataset in config.datasets:
            for k in config.ks:
                for variant, kind, _ in variants(config):
                    diff = records[ensemble_name(dataset, k, variant)].get("differences") or {}
                    if kind == "anti_distillation" and side in diff:
                        entries.append(diff[side])
                        clusters.append(f"{dataset}/K{k}")
        out[side] = {}
        for metric in REPORT_METRICS:
            pooled = stats.pooled_difference(
                [e[metric]["diff"] for e in entries], clusters, key, **kw
            )
            counts = dict.fromkeys(("lower", "higher", "no difference", "undefined"), 0)
            for e in entries:
                counts[stats.holm_verdict(e[metric], alpha)] += 1
            out[side][metric] = {**pooled, "verdicts": counts}
        out[side]["lower_clean"] = sum(
            stats.holm_verdict(e["pd_abs"], alpha) == "lower"
            and stats.holm_verdict(e["churn"], alpha) != "higher"
            and stats.holm_verdict(e["acc_mean"], alpha) != "lower"
            for e in entries
        )
    out["family"] = {
        side: sum(side in (r.get("differences") or {}) for r in records.values())
        for side in COMPARISONS
    }
    out.update(
        alpha=alpha,
        min_clusters=stats.min_clusters(config.level),
        min_p=2 / (config.num_samples + 1),
    )
    return out
