"""The anti-distillation study (Shamir & Coviello): does decorrelating an ensemble's components
make replicas of the ensemble agree more than plain ensembling does?

Defines ``AntiDistillationConfig``, the study's trials and its report, and registers them with
``jaxrepro.study.run``. The binary ``experiments/anti_distillation.py`` is flags over the config.

Per dataset (MNIST-1D and the project's synthetic data by default) the study trains R replicas
each of:

- ``single``: one MLP, trained as ``R * max(ks)`` replicas so that groups of k consecutive
  replicas give the reference of methods.md section 6 at equal compute: ensembles of k
  independently trained models (``metrics.ensemble_curve``, k in 1 and ``ks``);
- ``ensemble-K{K}/plain``: a K-component ensemble (``models.Ensemble``, K towers) trained with
  the task loss of the ensemble prediction (``over``);
- ``ensemble-K{K}/ad-{lambda}``: the same plus lambda times the decorrelation penalty
  (``losses.anti_distillation``), for each lambda of the sweep;
- ``ensemble-K{K}/codistill-{alpha}``: the same plus alpha times the codistillation term
  (``losses.codistillation``, Anil et al.), the opposite push: components towards each other.

Every trial records ``metrics.compare`` of its replicas' test predictions with bootstrap
intervals over replicas, and the per-pair churn and pd_abs (``pairs``) from which the report
draws bootstrap intervals of *differences*: anti-distilled against plain ensemble of the same
K (paired: replica r of both trials has the same keys, so its initialisation and data order
are shared; the units resampled are the replicas), and any ensemble against the independent
ensembles of k = K (unpaired). Ensemble trials also record the mean Pearson correlation
between their components (``losses.pairwise_correlation``, the quantity the penalty acts on)
on the training and the test set: a penalty that only decorrelates on the training data
(Jeffares et al. 2023) shows up as a test correlation well above the training one. The
correlation of the logits centred per example is recorded too: the softmax ignores a shift
common to all classes, so raw logits can decorrelate without the predictions changing.

References:
  Shamir & Coviello, "Anti-Distillation: Improving Reproducibility of Deep Networks",
  arXiv 2010.09923; Anil et al. 2018, arXiv 1804.03235; Jeffares et al. 2023, "Joint training
  of deep ensembles fails due to learner collusion"; methods.md sections 6 and 7.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from jaxrepro import data, engine, losses, metrics, models, optim, plots, randomness, synthetic
from jaxrepro.study import (
    ConfigError,
    StudyConfig,
    Trial,
    check_activation,
    check_unique,
    check_widths,
    evaluate_predictions,
    fit_config,
    flag_field,
    fmt,
    is_int,
    markdown_table,
    predict_finite,
    record_metric,
    register,
    require,
    subset,
)

AD_DATASETS = ("mnist1d", "synthetic", "digits")
"""Datasets of the study: MNIST-1D, the project's synthetic data (``jaxrepro.synthetic``) and
scikit-learn's digits."""

SYNTHETIC_SIZES = (4000, 1000)
"""Training and test examples of the synthetic data when ``num_train`` / ``num_test`` is 0 (the
sizes of MNIST-1D's split)."""

REPORT_METRICS = ("acc_mean", "churn", "pd_abs", "pd_rel")
"""The metrics of the tables and plots."""

PAIR_METRICS = ("churn", "pd_abs")
"""Pairwise metrics whose per-pair values are recorded, for intervals of differences."""


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

    datasets: tuple[str, ...] = flag_field(
        ("mnist1d", "synthetic"), "datasets: mnist1d, synthetic (jaxrepro.synthetic), digits"
    )
    replicas: int = flag_field(16, "replicas R of each ensemble trial (the single-model trial "
                                   "trains R * max(ks))")
    epochs: int = flag_field(20, "training epochs")
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
        "ensemble", "task loss of an ensemble: of the ensemble prediction (ensemble, methods.md "
                    "section 7) or the mean of the components' losses (components)"
    )
    vary: tuple[str, ...] = flag_field(("init", "order"), "sources varied between replicas")
    batch_size: int = flag_field(128, "batch size")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    num_train: int = flag_field(
        0, f"training examples (0: all of mnist1d/digits, {SYNTHETIC_SIZES[0]} synthetic)"
    )
    num_test: int = flag_field(
        0, f"test examples (0: all of mnist1d/digits, {SYNTHETIC_SIZES[1]} synthetic)"
    )
    synthetic_dim: int = flag_field(10, "input dimension of the synthetic data")
    synthetic_teacher: str = flag_field("single", "synthetic teacher: linear, single or mlp")
    synthetic_temperature: float = flag_field(0.25, "label temperature of the synthetic data")
    data_seed: int = flag_field(0, "seed of the synthetic data (independent of the replicas')")
    num_samples: int = flag_field(1000, "bootstrap samples of the intervals")
    level: float = flag_field(0.95, "confidence level of the intervals")
    seed: int = flag_field(0, "root seed of the replicas (and of the bootstrap)")

    def __post_init__(self):
        self._check_common()
        check_unique("datasets", self.datasets)
        for name in self.datasets:
            require(name in AD_DATASETS, "datasets",
                    f"unknown dataset {name!r}; choose from {', '.join(AD_DATASETS)}")
        check_widths("widths", self.widths)
        check_activation("activation", self.activation)
        check_unique("ks", self.ks)
        require(all(is_int(k) and 2 <= k <= 16 for k in self.ks), "ks",
                f"must be ints in [2, 16] (components per ensemble), got {list(self.ks)!r}")
        check_unique("lambdas", self.lambdas)
        require(all(_is_number(v) and math.isfinite(v) and v > 0 for v in self.lambdas),
                "lambdas", f"must be finite numbers > 0, got {list(self.lambdas)!r}")
        require(_is_number(self.codistillation_alpha)
                and math.isfinite(self.codistillation_alpha) and self.codistillation_alpha >= 0,
                "codistillation_alpha",
                f"must be a finite number >= 0, got {self.codistillation_alpha!r}")
        require(self.ad_output in losses.AD_OUTPUTS, "ad_output",
                f"must be one of {', '.join(losses.AD_OUTPUTS)}, got {self.ad_output!r}")
        require(self.ad_penalty in ("squared", "absolute"), "ad_penalty",
                f"must be squared or absolute, got {self.ad_penalty!r}")
        require(self.over in losses.OVER, "over",
                f"must be one of {', '.join(losses.OVER)}, got {self.over!r}")
        try:
            randomness.check_sources(self.vary, what="vary")
        except ValueError as e:
            raise ConfigError("vary", str(e)) from None
        require(len(self.vary) > 0, "vary",
                "must name at least one source (otherwise every replica is identical)")
        require(self.num_train == 0 or self.batch_size <= self.num_train, "batch_size",
                f"{self.batch_size} is larger than num_train={self.num_train}")
        require(is_int(self.num_samples) and self.num_samples >= 1, "num_samples",
                f"must be an int >= 1, got {self.num_samples!r}")
        require(_is_number(self.level) and 0.0 < self.level < 1.0, "level",
                f"must be in (0, 1), got {self.level!r}")
        try:
            self.synthetic_spec()
        except ValueError as e:  # "synthetic <knob>: <problem>"
            knob = str(e).split(":")[0].replace("synthetic ", "")
            field = {"dim": "synthetic_dim", "teacher": "synthetic_teacher",
                     "temperature": "synthetic_temperature", "seed": "data_seed"}.get(knob, knob)
            raise ConfigError(field, str(e)) from None

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


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _num(v: float) -> str:
    """A weight as it appears in trial names: ``0.1``, ``1``, ``10``."""
    return f"{float(v):g}"


def single_name(dataset: str) -> str:
    return f"{dataset}/single"


def ensemble_name(dataset: str, k: int, variant: str) -> str:
    """``<dataset>/ensemble-K<k>/<variant>``: variant ``plain``, ``ad-<lambda>`` or
    ``codistill-<alpha>``."""
    return f"{dataset}/ensemble-K{k}/{variant}"


def _variants(config: AntiDistillationConfig) -> list[tuple[str, str, float | None]]:
    """(variant name, kind, weight) of the ensemble trials of one K, in report order."""
    out: list[tuple[str, str, float | None]] = [("plain", "plain", 0.0)]
    out += [(f"ad-{_num(lam)}", "anti_distillation", float(lam)) for lam in config.lambdas]
    if config.codistillation_alpha > 0:
        alpha = float(config.codistillation_alpha)
        out.append((f"codistill-{_num(alpha)}", "codistillation", alpha))
    return out


# ---------------------------------------------------------------------------------------------
# Trials.


def _datasets(config: AntiDistillationConfig) -> dict[str, data.Dataset]:
    out = {}
    for name in config.datasets:
        if name == "synthetic":
            out[name] = config.synthetic_spec().dataset()
        else:
            out[name] = subset(data.load(name), config.num_train, config.num_test)
    return out


def _loss(config: AntiDistillationConfig, kind: str, weight: float | None) -> losses.Loss:
    base = losses.softmax_cross_entropy(over=config.over)
    if kind == "anti_distillation":
        return losses.anti_distillation(base, weight, output=config.ad_output,
                                        penalty=config.ad_penalty)
    if kind == "codistillation":
        return losses.codistillation(base, weight)
    return base


def trials(config: AntiDistillationConfig) -> list[Trial]:
    tx = optim.optimizer("adam", config.learning_rate)
    vary = randomness.check_sources(config.vary)
    out = []
    for name, ds in _datasets(config).items():
        mlp = models.MLP(widths=tuple(config.widths), num_classes=ds.num_classes,
                         activation=config.activation)
        base = {"dataset": name, "num_train": ds.num_train, "num_test": ds.num_test,
                "vary": list(vary)}
        fit = fit_config(config, vary)
        out.append(Trial(
            name=single_name(name),
            task=engine.Task(model=mlp, tx=tx, loss_fn=losses.softmax_cross_entropy()),
            data=ds,
            fit=dataclasses.replace(fit, replicas=config.single_replicas),
            info={**base, "kind": "single", "K": 1, "lambda": None, "alpha": None,
                  "replicas": config.single_replicas},
            evaluate=_evaluate_single(config),
        ))
        for k in config.ks:
            model = models.Ensemble(mlp, num_components=k)
            for variant, kind, weight in _variants(config):
                out.append(Trial(
                    name=ensemble_name(name, k, variant),
                    task=engine.Task(model=model, tx=tx, loss_fn=_loss(config, kind, weight)),
                    data=ds,
                    fit=fit,
                    info={**base, "kind": kind, "K": k,
                          "lambda": weight if kind != "codistillation" else None,
                          "alpha": weight if kind == "codistillation" else None,
                          "replicas": config.replicas},
                    evaluate=_evaluate_ensemble(config),
                ))
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation.


def _ci_key(config: AntiDistillationConfig) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), 1)


def _compare_kwargs(config: AntiDistillationConfig) -> dict[str, Any]:
    return dict(key=_ci_key(config), num_samples=config.num_samples, level=config.level,
                over="replicas")


def pair_stats(probs_GxNxC: np.ndarray, labels_N: np.ndarray) -> dict[str, list[float]]:
    """Per-pair churn and pd_abs of G prediction sets, and their accuracies.

    Returns:
      ``{"churn": [P], "pd_abs": [P], "acc": [G]}`` with the P = G (G - 1) / 2 pairs in
      ``np.triu_indices(G, 1)`` order: for pair (r, s) the fraction of test examples on which
      their top-1 predictions differ, and the mean total variation ``1/2 sum_c |p_r - p_s|``.
      Their means over pairs are ``metrics.compare``'s churn and pd_abs.
    """
    p = np.asarray(probs_GxNxC, np.float64)
    g = p.shape[0]
    yhat = np.argmax(p, axis=-1)
    i, j = np.triu_indices(g, 1)
    churn = np.empty(len(i))
    tv = np.empty(len(i))
    for n, (a, b) in enumerate(zip(i, j, strict=True)):
        churn[n] = np.mean(yhat[a] != yhat[b])
        tv[n] = 0.5 * np.mean(np.sum(np.abs(p[a] - p[b]), axis=-1))
    acc = np.mean(yhat == np.asarray(labels_N)[None, :], axis=1)
    return {"churn": churn.tolist(), "pd_abs": tv.tolist(), "acc": acc.tolist()}


def _group(probs_RxNxC: np.ndarray, k: int) -> np.ndarray:
    """Ensembles of k consecutive replicas (the last R mod k left out), as ``metrics.ensemble``:
    their mean probabilities ``[R // k, N, C]``."""
    g = probs_RxNxC.shape[0] // k
    p = np.asarray(probs_RxNxC[: g * k], np.float64).reshape((g, k) + probs_RxNxC.shape[1:])
    return p.mean(axis=1).astype(np.float32)


def _evaluate_single(config: AntiDistillationConfig):
    def evaluate_fn(run: engine.Run, ds: data.Dataset) -> dict:
        probs_RxNxC, keep = predict_finite(run, ds)
        out = evaluate_predictions(run, ds, probs_RxNxC, keep, **_compare_kwargs(config))
        if out["metrics"] is None:
            return out
        ks = (1,) + tuple(sorted(config.ks))
        if int(keep.sum()) // max(ks) < 2:
            out["error"] = "too few finite replicas for ensembles of every k"
            return out
        curve = metrics.ensemble_curve(probs_RxNxC, ds.y_test, ks=ks, mask=keep)
        kept = probs_RxNxC[keep]
        for row in curve:
            # k = 1: the trial's own intervals (the same key and replicas); k > 1: the groups as
            # replicas (the same draws as ensemble_size=k; shares the ensembles' compilation).
            res = out["metrics"] if row["k"] == 1 else metrics.compare(
                _group(kept, row["k"]), ds.y_test, **_compare_kwargs(config))
            row.update({f"{m}_ci": res[f"{m}_ci"] for m in REPORT_METRICS if f"{m}_ci" in res})
        out["ensemble_curve"] = curve
        out["pairs"] = {str(k): {"ids": list(range(kept.shape[0] // k)),
                                 **pair_stats(_group(kept, k), ds.y_test)}
                        for k in sorted(config.ks)}
        return out

    return evaluate_fn


CORRELATIONS = losses.AD_OUTPUTS  # ("logits", "centred_logits", "residual")
"""Outputs whose correlation between components is recorded: the logits (what the penalty
sees with ``ad_output="logits"``), the logits centred per example over the classes (what the
softmax sees: a per-example shift common to all classes leaves the prediction unchanged but
changes the logits' correlation), and the residuals ``softmax - one-hot``."""


@jax.jit
def _mean_correlations(logits_RxKxNxC: jax.Array, labels_N: jax.Array) -> jax.Array:
    """``[3, R]``: per replica, the mean over component pairs of ``losses.pairwise_correlation``
    of each output of ``CORRELATIONS``."""
    k, c = logits_RxKxNxC.shape[1], logits_RxKxNxC.shape[-1]
    i, j = np.triu_indices(k, 1)
    onehot_NxC = jax.nn.one_hot(labels_N, c, dtype=logits_RxKxNxC.dtype)

    def one(logits_KxNxC):
        centred = logits_KxNxC - logits_KxNxC.mean(axis=-1, keepdims=True)
        residual = jax.nn.softmax(logits_KxNxC, axis=-1) - onehot_NxC[None]
        return jax.numpy.stack([losses.pairwise_correlation(o)[i, j].mean()
                                for o in (logits_KxNxC, centred, residual)])

    return jax.vmap(one, out_axes=1)(logits_RxKxNxC)


def component_stats(logits_RxKxNxC: np.ndarray, labels_N: np.ndarray) -> dict[str, Any]:
    """How far apart the K components of each replica are, on one set of examples.

    Returns:
      ``corr_<output>`` for each output of ``CORRELATIONS``: the mean over replicas of the mean
      over component pairs of ``losses.pairwise_correlation`` (class-averaged Pearson
      correlation over the examples), with ``corr_<output>_replicas`` the per-replica values;
      ``disagreement``: the mean fraction of examples on which two components of one replica
      predict different classes; ``component_acc``: the mean accuracy of a single component.
    """
    logits = np.asarray(logits_RxKxNxC, np.float32)
    labels = np.asarray(labels_N, np.int32)
    corr = np.asarray(_mean_correlations(logits, labels), np.float64)
    i, j = np.triu_indices(logits.shape[1], 1)
    yhat = np.argmax(logits, axis=-1)
    disagree = np.mean([np.mean(yhat[:, a] != yhat[:, b]) for a, b in zip(i, j, strict=True)])
    out: dict[str, Any] = {f"corr_{name}": float(np.mean(corr[n]))
                           for n, name in enumerate(CORRELATIONS)}
    out.update({f"corr_{name}_replicas": corr[n].tolist() for n, name in enumerate(CORRELATIONS)})
    out.update(disagreement=float(disagree),
               component_acc=float(np.mean(yhat == labels[None, None, :])))
    return out


def _evaluate_ensemble(config: AntiDistillationConfig):
    def evaluate_fn(run: engine.Run, ds: data.Dataset) -> dict:
        probs_RxNxC, keep = predict_finite(run, ds)
        out = evaluate_predictions(run, ds, probs_RxNxC, keep, **_compare_kwargs(config))
        if out["metrics"] is None:
            return out
        ids = np.flatnonzero(keep)
        out["pairs"] = {"ids": [int(v) for v in run.replica_ids[keep]],
                        **pair_stats(probs_RxNxC[keep], ds.y_test)}
        out["components"] = {}
        for split, x, y in (("test", ds.x_test, ds.y_test), ("train", ds.x_train, ds.y_train)):
            logits = run.predict(x, logits=True, components=True)[ids]
            out["components"][split] = component_stats(logits, y)
        return out

    return evaluate_fn


# ---------------------------------------------------------------------------------------------
# Intervals of differences (from the recorded per-pair values).


def _pair_matrix(flat: Sequence[float], g: int) -> np.ndarray:
    m = np.zeros((g, g))
    i, j = np.triu_indices(g, 1)
    m[i, j] = np.asarray(flat, np.float64)
    return m + m.T


def _resample_counts(rng: np.random.Generator, size: int, num_samples: int) -> np.ndarray:
    draws = rng.integers(0, size, (num_samples, size))
    counts = np.zeros((num_samples, size))
    np.add.at(counts, (np.arange(num_samples)[:, None], draws), 1.0)
    return counts


def _weighted_values(pairs: Mapping[str, Any], rows: np.ndarray, w_SxG: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """Each pairwise metric (and acc_mean) of the units ``rows`` weighted by multiplicities:
    pairs of distinct units weighted by w_r w_s, as ``metrics.bootstrap`` does."""
    g_all = len(pairs["acc"])
    out = {}
    ww = w_SxG[:, :, None] * w_SxG[:, None, :]
    norm = (w_SxG.sum(-1) ** 2 - (w_SxG**2).sum(-1)) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        for m in PAIR_METRICS:
            mat = _pair_matrix(pairs[m], g_all)[np.ix_(rows, rows)]
            out[m] = np.einsum("srt,rt->s", ww, mat) / 2 / norm
        out["acc_mean"] = w_SxG @ np.asarray(pairs["acc"], np.float64)[rows] / w_SxG.sum(-1)
    return out


def difference(a: Mapping[str, Any], b: Mapping[str, Any], *, paired: bool, seed: int,
               num_samples: int, level: float) -> dict[str, Any]:
    """Bootstrap intervals of ``metric(a) - metric(b)`` for churn, pd_abs and acc_mean.

    ``a`` and ``b`` are recorded ``pairs`` dicts (``ids``, per-pair values, accuracies).
    ``paired``: the units are the replica ids both hold, resampled together (replica r of two
    trials shares its keys); otherwise each side's units are resampled independently.
    Deterministic: the draws come from NumPy's PCG64 seeded by ``seed``.

    Returns:
      ``{metric: {"diff": point, "ci": [lo, hi]}}`` and ``units`` (the units of a and b).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xAD]))
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    if paired:
        common = sorted(set(a["ids"]) & set(b["ids"]))
        rows_a = np.asarray([a["ids"].index(v) for v in common], np.intp)
        rows_b = np.asarray([b["ids"].index(v) for v in common], np.intp)
        w = _resample_counts(rng, len(common), num_samples)
        w_a = w_b = w
    else:
        rows_a, rows_b = np.arange(len(a["ids"])), np.arange(len(b["ids"]))
        w_a = _resample_counts(rng, len(rows_a), num_samples)
        w_b = _resample_counts(rng, len(rows_b), num_samples)
    point_a = _weighted_values(a, rows_a, np.ones((1, len(rows_a))))
    point_b = _weighted_values(b, rows_b, np.ones((1, len(rows_b))))
    boot_a, boot_b = _weighted_values(a, rows_a, w_a), _weighted_values(b, rows_b, w_b)
    out: dict[str, Any] = {"units": [len(rows_a), len(rows_b)]}
    for m in PAIR_METRICS + ("acc_mean",):
        d = boot_a[m] - boot_b[m]
        d = d[np.isfinite(d)]
        ci = ([float(np.percentile(d, lo_q)), float(np.percentile(d, hi_q))] if d.size
              else [math.nan, math.nan])
        out[m] = {"diff": float(point_a[m][0] - point_b[m][0]), "ci": ci}
    return out


def _verdict(ci: Sequence[float]) -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undefined"
    if hi < 0:
        return "lower"
    if lo > 0:
        return "higher"
    return "no difference"


# ---------------------------------------------------------------------------------------------
# Report.


def _with_ci(m: Mapping[str, Any] | None, key: str) -> str:
    if not m:
        return "-"
    ci = m.get(key + "_ci")
    return fmt(m.get(key)) + ("" if ci is None else " " + fmt(ci))


def _curve_row(record: Mapping[str, Any], k: int) -> dict | None:
    for row in record.get("ensemble_curve") or []:
        if row["k"] == k:
            return row
    return None


def _diff_text(d: Mapping[str, Any], metric: str) -> str:
    e = d[metric]
    return f"{fmt(e['diff'], 4)} {fmt(e['ci'], 4)}"


def _differences(config, records, dataset) -> dict[tuple[int, str], dict[str, Any]]:
    """(K, variant) -> {"vs_plain": ..., "vs_independent": ...} differences."""
    single = records[single_name(dataset)]
    out = {}
    kw = dict(seed=config.seed, num_samples=config.num_samples, level=config.level)
    for k in config.ks:
        plain = records[ensemble_name(dataset, k, "plain")].get("pairs")
        indep = (single.get("pairs") or {}).get(str(k))
        for variant, _, _ in _variants(config):
            rec = records[ensemble_name(dataset, k, variant)]
            if rec.get("pairs") is None:
                continue
            entry = {}
            if variant != "plain" and plain is not None:
                entry["vs_plain"] = difference(rec["pairs"], plain, paired=True, **kw)
            if indep is not None:
                entry["vs_independent"] = difference(rec["pairs"], indep, paired=False, **kw)
            out[(k, variant)] = entry
    return out


def report(config: AntiDistillationConfig, records, workdir: Path):
    pct = int(round(config.level * 100))
    lines = [
        f"Each row trains replicas of a {config.activation} MLP component "
        f"{list(config.widths)} (Adam {config.learning_rate}, batch {config.batch_size}, "
        f"{config.epochs} epochs, varying {'+'.join(config.vary)}): 'single' is one MLP "
        f"trained as {config.single_replicas} replicas, 'k=K indep.' the ensembles of K "
        "consecutive ones (methods.md section 6: the reference at equal compute), the other "
        f"rows {config.replicas} replicas of a K-component ensemble (K towers) trained with "
        f"the {config.over} task loss ('plain'), plus lambda times the anti-distillation "
        f"penalty ('ad-lambda': mean over component pairs of the {config.ad_penalty} "
        f"class-averaged batch correlation of their {config.ad_output}) or plus alpha times "
        "the codistillation term ('codistill-alpha': KL to the mean of the other components). "
        f"Brackets: {pct}% bootstrap intervals over replicas ({config.num_samples} samples). "
        f"corr {config.ad_output} test / train: the mean correlation between the components' "
        f"{config.ad_output} over the whole test / training set (what the penalty pushes down, "
        "batch by batch, in training); corr centred: the same for the logits centred per "
        "example over the classes (the part of the logits the softmax sees: a shift common to "
        "all classes of an example changes the logits' correlation but not the prediction); "
        "comp. disagree: how often two components of one replica predict different classes "
        "on a test example; comp. acc: the mean test accuracy of one component alone.",
        "",
        f"Test: the difference of a metric between two trials with its {pct}% bootstrap "
        "interval; anti-distilled against plain ensemble of the same K is paired (replica r of "
        "both trials shares its initial keys and data order; replicas are resampled together), "
        "against the independent ensembles of k = K unpaired. A difference counts when its "
        f"interval excludes 0 (each interval alone at {pct}%; no correction for the "
        f"{len(config.lambdas) * len(config.ks) * len(config.datasets)} comparisons).",
        "",
    ]
    summary, diff_lines, points = [], [], []
    tally = dict.fromkeys(_TALLY, 0)
    for dataset in config.datasets:
        diffs = _differences(config, records, dataset)
        lines += _dataset_section(config, records, dataset, diffs)
        sentences, counts = _summary(config, records, dataset, diffs)
        summary += sentences
        tally = {key: tally[key] + counts[key] for key in tally}
        for k in config.ks:
            for variant, _, _ in _variants(config):
                comp = records[ensemble_name(dataset, k, variant)].get("components")
                if comp:
                    points.append({"group": f"{dataset} K={k}", "series": variant,
                                   "x": comp["train"][f"corr_{config.ad_output}"],
                                   "y": comp["test"][f"corr_{config.ad_output}"]})
        png = f"{dataset}_lambda.png"
        _lambda_plot(workdir / png, config, records, dataset)
        png_k = f"{dataset}_k.png"
        _k_plot(workdir / png_k, config, records, dataset)
        diff_lines += [
            f"![{dataset}: metrics against lambda]({png})",
            "",
            f"{dataset}: each panel shows a metric against lambda (0: the plain ensemble; "
            "'codist': the codistilled one) per K, with its interval; the dotted line of the "
            "same colour is the independent ensembles of k = K (band: interval), the grey "
            "dashed line the single model.",
            "",
            f"![{dataset}: metrics against ensemble size]({png_k})",
            "",
            f"{dataset}: each metric against the ensemble size: the black line is the "
            "independent ensembles of k models; the coloured points the jointly trained "
            "K-component ensembles (plain, every lambda, codistilled), spread around x = K.",
            "",
        ]
    _correlation_plot(workdir / "component_correlation.png", points, config.ad_output)
    total = sum(tally[key] for key in ("lower", "higher", "no difference", "undefined"))
    summary.append(
        f"- Overall: of {total} anti-distilled ensembles (dataset x K x lambda), "
        f"{tally['lower']} have a pd_abs lower than the plain ensemble of the same K "
        f"({tally['lower_clean']} of them with churn not higher and accuracy not lower), "
        f"{tally['higher']} higher, {tally['no difference']} not distinguishable"
        + (f", {tally['undefined']} undefined" if tally["undefined"] else "")
        + f"; {tally['lower_indep']} are lower than the independent ensembles of k = K (equal "
        f"compute). Criterion: the {pct}% paired bootstrap interval of the difference excludes "
        "0.")
    return (["## Findings", ""] + summary + [""] + lines + diff_lines + [
        "![component correlation](component_correlation.png)",
        "",
        "Each point is an ensemble trial: the mean correlation between its components' "
        f"{config.ad_output} (the penalised output) on the training set (x) and the test set "
        "(y). Points near the diagonal decorrelate "
        "as much on held-out data as on training data; points above it are less diverse on "
        "the test set than training suggests (Jeffares et al. 2023).",
        "",
    ])


def _dataset_section(config, records, dataset, diffs) -> list[str]:
    single = records[single_name(dataset)]
    out_key = f"corr_{config.ad_output}"
    header = ["trial", "K", "lambda / alpha"] + list(REPORT_METRICS) + [
        f"corr {config.ad_output} test / train", "corr centred test", "comp. disagree",
        "comp. acc"]
    rows = [["single", 1, "-"] + [_with_ci(single.get("metrics"), m) for m in REPORT_METRICS]
            + ["-"] * 4]
    for k in config.ks:
        row = _curve_row(single, k)
        rows.append([f"k={k} indep.", k, "-"] + [_with_ci(row, m) for m in REPORT_METRICS]
                    + ["-"] * 4)
    for k in config.ks:
        for variant, kind, weight in _variants(config):
            rec = records[ensemble_name(dataset, k, variant)]
            comp = rec.get("components") or {}
            test, train = comp.get("test") or {}, comp.get("train") or {}
            rows.append(
                [variant, k, _num(weight) if kind != "plain" else "0"]
                + [_with_ci(rec.get("metrics"), m) for m in REPORT_METRICS]
                + [f"{fmt(test.get(out_key))} / {fmt(train.get(out_key))}",
                   fmt(test.get("corr_centred_logits")), fmt(test.get("disagreement")),
                   fmt(test.get("component_acc"))])
    n_test = single["info"]["num_test"]
    n_train = single["info"]["num_train"]
    out = [f"## {dataset} ({n_train} training, {n_test} test examples)", "",
           markdown_table(header, rows), ""]
    drows = []
    for (k, variant), entry in diffs.items():
        vp, vi = entry.get("vs_plain"), entry.get("vs_independent")
        drows.append([
            f"K={k} {variant}",
            _diff_text(vp, "pd_abs") if vp else "-",
            _diff_text(vp, "churn") if vp else "-",
            _diff_text(vp, "acc_mean") if vp else "-",
            _verdict(vp["pd_abs"]["ci"]) if vp else "-",
            _diff_text(vi, "pd_abs") if vi else "-",
            _diff_text(vi, "churn") if vi else "-",
            _verdict(vi["pd_abs"]["ci"]) if vi else "-",
        ])
    out += [
        f"Differences on {dataset}: the trial minus the plain ensemble of the same K (paired), "
        "and minus the independent ensembles of k = K (unpaired); 'pd_abs' says whether the "
        "trial's pd_abs is lower, higher or not distinguishable.",
        "",
        markdown_table(["trial", "d pd_abs vs plain", "d churn vs plain", "d acc vs plain",
                        "pd_abs vs plain", "d pd_abs vs indep.", "d churn vs indep.",
                        "pd_abs vs indep."], drows),
        "",
    ]
    return out


_TALLY = ("lower", "higher", "no difference", "undefined", "lower_indep", "lower_clean")


def _costs(d: Mapping[str, Any]) -> list[str]:
    """What a pd_abs reduction cost, from a ``difference``: higher churn, lower accuracy (a
    flatter, less accurate prediction also has a smaller pd_abs)."""
    out = []
    if _verdict(d["churn"]["ci"]) == "higher":
        out.append("higher churn")
    if _verdict(d["acc_mean"]["ci"]) == "lower":
        out.append("lower accuracy")
    return out


def _phrase(verdict: str) -> str:
    return {"lower": "lower than", "higher": "higher than",
            "no difference": "not distinguishable from"}.get(verdict, "undefined against")


def _summary(config, records, dataset, diffs) -> tuple[list[str], dict[str, int]]:
    """Findings sentences of one dataset, and the tally of the anti-distillation verdicts."""
    out, tally = [], dict.fromkeys(_TALLY, 0)
    single = records[single_name(dataset)]
    for k in config.ks:
        plain = records[ensemble_name(dataset, k, "plain")]
        indep = _curve_row(single, k)
        ad = {v: e for (kk, v), e in diffs.items()
              if kk == k and v.startswith("ad-") and "vs_plain" in e}
        text = (f"- {dataset}, K={k}: pd_abs of the single model "
                f"{fmt(record_metric(single, 'pd_abs'))}, of independent ensembles of {k} "
                f"{fmt(indep['pd_abs']) if indep else '-'}, of the plain {k}-component ensemble "
                f"{fmt(record_metric(plain, 'pd_abs'))}.")
        if ad:
            verdicts = {v: _verdict(e["vs_plain"]["pd_abs"]["ci"]) for v, e in ad.items()}
            for v, verdict in verdicts.items():
                tally[verdict] += 1
                vi = ad[v].get("vs_independent")
                tally["lower_indep"] += bool(vi and _verdict(vi["pd_abs"]["ci"]) == "lower")
            lower = [v for v, x in verdicts.items() if x == "lower"]
            higher = [v for v, x in verdicts.items() if x == "higher"]
            if lower:
                costs = {v: _costs(ad[v]["vs_plain"]) for v in lower}
                tally["lower_clean"] += sum(not c for c in costs.values())
                text += (" Anti-distillation reduced pd_abs beyond plain ensembling at "
                         + ", ".join(v + (f" (but {' and '.join(costs[v])})" if costs[v] else
                                          " (churn and accuracy no worse)") for v in lower))
            else:
                text += (" Anti-distillation did not reduce pd_abs beyond plain ensembling at any "
                         "lambda")
            if higher:
                text += f" and increased it at {', '.join(higher)}"
            best = min(ad, key=lambda v: ad[v]["vs_plain"]["pd_abs"]["diff"])
            d, rec = ad[best]["vs_plain"], records[ensemble_name(dataset, k, best)]
            text += (f". Lowest pd_abs at {best}: {fmt(record_metric(rec, 'pd_abs'))}, minus "
                     f"plain {_diff_text(d, 'pd_abs')}, churn {_diff_text(d, 'churn')}, "
                     f"accuracy {_diff_text(d, 'acc_mean')}")
            vi = ad[best].get("vs_independent")
            if vi:
                text += (f"; {_phrase(_verdict(vi['pd_abs']['ci']))} the independent ensembles "
                         f"of {k} ({_diff_text(vi, 'pd_abs')})")
            strongest = max(ad, key=lambda v: records[ensemble_name(dataset, k, v)]["info"][
                "lambda"])
            comp = [(records[ensemble_name(dataset, k, v)].get("components") or {})
                    for v in ("plain", strongest)]
            key = f"corr_{config.ad_output}"
            if all(c.get("test") for c in comp):
                text += (f". Component correlation of the {config.ad_output} (test / train): "
                         f"plain {fmt(comp[0]['test'][key])} / {fmt(comp[0]['train'][key])}, "
                         f"{strongest} {fmt(comp[1]['test'][key])} / "
                         f"{fmt(comp[1]['train'][key])} (centred logits, test: "
                         f"{fmt(comp[0]['test']['corr_centred_logits'])}, "
                         f"{fmt(comp[1]['test']['corr_centred_logits'])}); components disagree on "
                         f"{fmt(comp[0]['test']['disagreement'])} and "
                         f"{fmt(comp[1]['test']['disagreement'])} of test examples")
        for (kk, v), e in diffs.items():
            if kk == k and v.startswith("codistill-") and "vs_plain" in e:
                rec = records[ensemble_name(dataset, k, v)]
                text += (f". Codistillation ({v}): pd_abs {fmt(record_metric(rec, 'pd_abs'))}, "
                         f"{_phrase(_verdict(e['vs_plain']['pd_abs']['ci']))} plain "
                         f"({_diff_text(e['vs_plain'], 'pd_abs')})")
                if "vs_independent" in e:
                    vi = e["vs_independent"]
                    text += (f" and {_phrase(_verdict(vi['pd_abs']['ci']))} the independent "
                             f"ensembles ({_diff_text(vi, 'pd_abs')})")
                text += f", accuracy {fmt(record_metric(rec, 'acc_mean'))}"
        out.append(text + ".")
    return out, tally


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily, Agg canvas, atomic writes; see jaxrepro.plots).


def _value_err(m: Mapping[str, Any] | None, key: str):
    """(value, [[below], [above]]) for errorbar; NaN and None when undefined."""
    if not m or m.get(key) is None:
        return math.nan, None
    v = float(m[key])
    ci = m.get(key + "_ci")
    if not ci or None in ci:
        return v, None
    return v, [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]]


def _lambda_plot(path: Path, config, records, dataset) -> Path:
    variants = _variants(config)
    labels = ["0 (plain)" if kind == "plain" else
              (_num(w) if kind == "anti_distillation" else f"codist {_num(w)}")
              for _, kind, w in variants]
    fig, axes = plots.figure(len(REPORT_METRICS), width=3.8, height=3.4)
    single = records[single_name(dataset)]
    for ax, metric in zip(axes, REPORT_METRICS, strict=True):
        for ci_k, k in enumerate(config.ks):
            color = f"C{ci_k}"
            xs, ys = [], []
            for x, (variant, kind, _) in enumerate(variants):
                v, err = _value_err(records[ensemble_name(dataset, k, variant)].get("metrics"),
                                    metric)
                off = (ci_k - (len(config.ks) - 1) / 2) * 0.08
                ax.errorbar([x + off], [v], yerr=err, fmt="o" if kind != "codistillation"
                            else "s", color=color, capsize=2, markersize=4)
                if kind != "codistillation":
                    xs.append(x + off)
                    ys.append(v)
            ax.plot(xs, ys, color=color, label=f"K={k}")
            ref = _curve_row(single, k)
            if ref and ref.get(metric) is not None:
                ax.axhline(ref[metric], color=color, linestyle=":", linewidth=1.2,
                           label=f"indep. k={k}")
                ci = ref.get(metric + "_ci")
                if ci and None not in ci:
                    ax.axhspan(ci[0], ci[1], color=color, alpha=0.12, linewidth=0)
        v = record_metric(single, metric)
        if math.isfinite(v):
            ax.axhline(v, color="gray", linestyle="--", linewidth=1, label="single")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel("lambda")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{dataset}: anti-distilled ensembles against lambda "
                 f"(R={config.replicas}, {config.ad_output}, {config.ad_penalty})")
    return plots.save(fig, path)


def _k_plot(path: Path, config, records, dataset) -> Path:
    variants = _variants(config)
    single = records[single_name(dataset)]
    curve = single.get("ensemble_curve") or []
    fig, axes = plots.figure(len(REPORT_METRICS), width=3.8, height=3.4)
    for ax, metric in zip(axes, REPORT_METRICS, strict=True):
        xs = [row["k"] for row in curve]
        ys = [_value_err(row, metric)[0] for row in curve]
        errs = [_value_err(row, metric)[1] for row in curve]
        below = [e[0][0] if e else 0.0 for e in errs]
        above = [e[1][0] if e else 0.0 for e in errs]
        if xs:
            ax.errorbar(xs, ys, yerr=[below, above], color="black", marker="o", capsize=2,
                        label="indep. ensembles of k")
        for vi, (variant, _, _) in enumerate(variants):
            for k in config.ks:
                off = 1 + (vi - (len(variants) - 1) / 2) * 0.06
                v, err = _value_err(records[ensemble_name(dataset, k, variant)].get("metrics"),
                                    metric)
                ax.errorbar([k * off], [v], yerr=err, fmt="o", color=f"C{vi}", capsize=2,
                            markersize=4, label=variant if k == config.ks[0] else None)
        ax.set_xscale("log", base=2)
        ticks = sorted({1, *config.ks})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("ensemble size k / K")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{dataset}: joint K-component ensembles against independent ensembles")
    return plots.save(fig, path)


def _correlation_plot(path: Path, points: Sequence[Mapping[str, Any]], output: str) -> Path:
    """Test against training correlation of the components, one point per ensemble trial
    (colour: variant; marker: dataset and K), with the diagonal; negative values are kept."""
    fig, (ax,) = plots.figure(1, width=6.4, height=5.2)
    colors: dict[str, str] = {}
    markers: dict[str, str] = {}
    lo, hi = 0.0, 0.1
    for p in points:
        x, y = p["x"], p["y"]
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        color = colors.setdefault(p["series"], f"C{len(colors) % 10}")
        marker = markers.setdefault(p["group"], "osD^vP*Xph"[len(markers) % 10])
        ax.plot([x], [y], marker=marker, color=color, linestyle="none",
                label=f"{p['group']} {p['series']}")
        lo, hi = min(lo, x, y), max(hi, x, y)
    pad = 0.05 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", linestyle="--",
            linewidth=1, label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"mean correlation of component {output}, training set")
    ax.set_ylabel(f"mean correlation of component {output}, test set")
    ax.set_title("Do components stay decorrelated on held-out data?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="xx-small", ncols=2)
    return plots.save(fig, path)


register(AntiDistillationConfig, "Anti-distillation: decorrelated ensembles and "
         "reproducibility", trials, report)
