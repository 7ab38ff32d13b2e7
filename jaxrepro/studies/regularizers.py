"""The regulariser study: do common regularisers make MLPs more reproducible?

After apurvakokate/Reproducibility ("Do regularizers improve reproducibility?", PyTorch MLPs):
train replica sets of MLPs of one width and several depths, with no regulariser (the baseline)
and with one regulariser at a time (weight decay, dropout, LayerNorm, BatchNorm, residual
connections, label smoothing), under each optimizer (SGD, SGD with momentum, Adam), and compare
accuracy, churn (the seed repository's prediction difference) and Effective Test Accuracy
(``eta`` = mean accuracy - churn). Each regularised arm is compared with its baseline (same
depth, same optimizer) by a paired test of the difference in PD.

Defines ``RegularizersConfig``, the study's trials and its report, the paired test
``paired_bootstrap`` (a pure function), and registers the study with ``jaxrepro.study.run``.
The binary ``experiments/regularizers.py`` is flags over the config.

**Pairing.** Replica r of every arm of one (depth, optimizer) cell uses the same keys (same
seed, same replica ids, same varied sources): the same initial weights of the shared Dense
layers (Flax derives a layer's key from its name, so a LayerNorm or BatchNorm layer does not
shift them), the same data order and the same dropout keys; and every arm predicts the same
test examples. Replicas that diverged in either arm are left out of the comparison in both.
A baseline's test predictions are kept in memory for its arms (it precedes them in the trial
order); a run resumed after an interruption between a baseline and its arms trains the
baseline again, bitwise the same, to pair them.

**The test: a paired two-way bootstrap.** PD is a mean over replica pairs and test examples,
so its uncertainty has two sources: having trained only R replicas, and having only N test
examples. ``paired_bootstrap`` resamples both, with replacement, and uses the *same* draws for
the two arms: each sample draws replica multiplicities w (R draws) and example multiplicities
v (N draws) and computes, for each arm, PD over pairs of distinct replicas weighted by
``w_r w_s`` and examples weighted by ``v_n`` (the convention of ``metrics.bootstrap``: copies
of one replica never form a pair); the sample's difference is regularised minus baseline. The
difference is called significant when the central 95% (``level``) percentile interval of the
differences excludes 0; the reported p-value is the two-sided bootstrap p-value
``2 (min(#{d <= 0}, #{d >= 0}) + 1) / (B + 1)`` capped at 1 (identical arms give d = 0 in every
sample: interval [0, 0], p = 1).

Why this test rather than a permutation or Wilcoxon test on per-example PD: those condition on
the R trained replicas and treat only the test examples as random, so with R = 8 they
understate the run-to-run uncertainty (a cell can look significant because of one unlucky
replica). Resampling replicas keeps that source in; resampling examples keeps the finite test
set in; using the same draws for both arms keeps the pairing (both arms' PD move together
with the drawn replicas and examples, so the difference's interval is much narrower than the
two separate intervals). The two-way bootstrap of a crossed design (replicas x examples) is
known to be somewhat conservative (it counts the replica-by-example interaction twice;
McCullagh 2000, "Resampling and exchangeable arrays"), which errs on the side of "not
significant". No correction for the number of comparisons is applied; the report says how
many flags chance alone would give.

References:
  apurvakokate/Reproducibility (README and ``ex_mlp.py``: Effective Test Accuracy);
  methods.md sections 4-5; Efron & Tibshirani 1993; McCullagh 2000 (Bernoulli 6(2)).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from jaxrepro import data, engine, losses, models, optim, plots, randomness
from jaxrepro.study import (
    ConfigError,
    StudyConfig,
    Trial,
    check_unique,
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

BASELINE = "none"
"""The arm with no regulariser, trained in every (depth, optimizer) cell."""

REGULARIZERS = ("weight_decay", "dropout", "layernorm", "batchnorm", "residual",
                "label_smoothing")
"""The regularisers, each switched on alone against the baseline."""

DATASETS = ("mnist1d", "digits")

PAIRED_METRICS = ("pd_abs", "churn", "acc_mean", "eta")
"""Metrics whose regularised-minus-baseline difference ``paired_bootstrap`` tests."""

_BATCH = 100  # bootstrap samples per batch (fixed: the draws must not depend on it)


@dataclasses.dataclass(frozen=True)
class RegularizersConfig(StudyConfig):
    """The regulariser study: every (depth, optimizer) cell trains a baseline MLP and one arm
    per regulariser, ``replicas`` replicas each, and tests each arm's PD against the
    baseline's."""

    STUDY: ClassVar[str] = "regularizers"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        depths=(2,),
        width=32,
        regularizers=("dropout", "layernorm"),
        optimizers=("adam",),
        replicas=4,
        epochs=2,
        num_train=512,
        num_test=256,
        num_samples=200,
    )

    dataset: str = flag_field("mnist1d", "dataset: mnist1d or digits")
    depths: tuple[int, ...] = flag_field((2, 6, 20), "MLP depths (number of hidden layers)")
    width: int = flag_field(128, "width of every hidden layer")
    regularizers: tuple[str, ...] = flag_field(
        REGULARIZERS, "regularisers, each tested alone against the baseline (always trained): "
        + ", ".join(REGULARIZERS))
    optimizers: tuple[str, ...] = flag_field(optim.OPTIMIZERS, "optimizers: sgd, momentum "
                                             "(SGD with heavy-ball momentum), adam")
    sgd_learning_rate: float = flag_field(0.3, "learning rate of plain SGD")
    momentum_learning_rate: float = flag_field(0.03, "learning rate of SGD with momentum")
    adam_learning_rate: float = flag_field(3e-3, "learning rate of Adam")
    momentum: float = flag_field(0.9, "momentum coefficient of the momentum optimizer")
    weight_decay: float = flag_field(5e-4, "L2 weight decay of the weight_decay arm (added to "
                                     "the gradient, as PyTorch's weight_decay)")
    dropout_rate: float = flag_field(0.1, "dropout rate of the dropout arm")
    label_smoothing: float = flag_field(0.1, "epsilon of the label_smoothing arm")
    vary: tuple[str, ...] = flag_field(
        ("init", "order"), "sources of randomness that differ between replicas: "
        + ", ".join(randomness.SOURCES) + " or all (empty: the control, identical replicas)")
    replicas: int = flag_field(8, "replicas per trial (>= 2)")
    epochs: int = flag_field(15, "training epochs")
    batch_size: int = flag_field(128, "batch size")
    num_train: int = flag_field(0, "training examples to use (0: all)")
    num_test: int = flag_field(0, "test examples to use (0: all)")
    seed: int = flag_field(0, "root seed of the replicas (and of the bootstraps)")
    num_samples: int = flag_field(1000, "bootstrap samples of the intervals and paired tests")
    level: float = flag_field(0.95, "confidence level of the intervals and the paired tests")

    def __post_init__(self):
        self._check_common()
        for name in ("width", "num_samples"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, name, f"must be an int >= 1, got {value!r}")
        require(self.dataset in DATASETS, "dataset",
                f"must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        check_unique("depths", self.depths)
        require(all(is_int(d) and d >= 1 for d in self.depths), "depths",
                f"must be positive ints (hidden layers), got {list(self.depths)!r}")
        check_unique("regularizers", self.regularizers)
        for name in self.regularizers:
            require(name != BASELINE, "regularizers",
                    f"{BASELINE!r} is the baseline, always trained; list only regularisers")
            require(name in REGULARIZERS, "regularizers",
                    f"unknown regulariser {name!r}; choose from {', '.join(REGULARIZERS)}")
        check_unique("optimizers", self.optimizers)
        for name in self.optimizers:
            require(name in optim.OPTIMIZERS, "optimizers",
                    f"unknown optimizer {name!r}; choose from {', '.join(optim.OPTIMIZERS)}")
        for name in ("sgd_learning_rate", "momentum_learning_rate", "adam_learning_rate"):
            value = getattr(self, name)
            require(_number(value) and value > 0, name,
                    f"must be a positive number, got {value!r}")
        require(_number(self.momentum) and 0 <= self.momentum < 1, "momentum",
                f"must be in [0, 1), got {self.momentum!r}")
        require(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                f"must be a finite number >= 0, got {self.weight_decay!r}")
        require(_number(self.dropout_rate) and 0 <= self.dropout_rate < 1, "dropout_rate",
                f"must be in [0, 1), got {self.dropout_rate!r}")
        require(_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
                "label_smoothing", f"must be in [0, 1), got {self.label_smoothing!r}")
        require(len(set(self.vary)) == len(self.vary), "vary",
                f"has duplicates: {list(self.vary)!r}")
        try:
            randomness.check_sources(self.vary)
        except ValueError as e:
            raise ConfigError("vary", str(e)) from None
        require(_number(self.level) and 0 < self.level < 1, "level",
                f"must be in (0, 1), got {self.level!r}")

    def learning_rate_of(self, optimizer: str) -> float:
        """The learning rate flag of ``optimizer``."""
        return getattr(self, f"{optimizer}_learning_rate")


def _number(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(v))


# ---------------------------------------------------------------------------------------------
# The paired test (pure).


def _pair_terms(probs_RxNxC: np.ndarray, labels_N: np.ndarray):
    """Per pair r < s and example: TV distance and top-1 disagreement ``[P, N]``; per replica
    and example: correctness ``[R, N]``."""
    r = probs_RxNxC.shape[0]
    p = np.asarray(probs_RxNxC, np.float64)
    yhat = np.argmax(p, axis=-1)
    tv, dis = [], []
    for i in range(r - 1):
        tv.append(0.5 * np.abs(p[i][None] - p[i + 1:]).sum(-1))
        dis.append((yhat[i][None] != yhat[i + 1:]).astype(np.float64))
    correct = (yhat == labels_N[None]).astype(np.float64)
    return np.concatenate(tv), np.concatenate(dis), correct


def _counts(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """Multiplicities ``[rows, size]`` of ``rows`` bootstrap samples of ``size`` items."""
    draw = rng.integers(0, size, (rows, size))
    flat = (np.arange(rows)[:, None] * size + draw).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size).astype(np.float64)


def paired_bootstrap(probs_a, probs_b, labels, *, mask=None, num_samples: int = 1000,
                     level: float = 0.95, seed: int | Sequence[int] = 0) -> dict[str, Any]:
    """Paired two-way bootstrap of the difference of PD (and accuracy) between two arms.

    Replica r of arm a is paired with replica r of arm b (they share every key), and both arms
    predict the same N examples. Each bootstrap sample draws replica multiplicities w (R
    draws with replacement) and example multiplicities v (N draws), the same for both arms,
    and computes each arm's metric with those weights: the pairwise metrics (``pd_abs``: mean
    total-variation distance, ``churn``: top-1 disagreement) average over pairs of *distinct*
    replicas weighted by ``w_r w_s`` (a sample that drew a single replica R times has no pair
    and is left out), ``acc_mean`` over replicas weighted by ``w_r``; ``eta`` = acc_mean -
    churn. Every example term is weighted by ``v_n``. The differences a - b of the samples
    give a percentile interval and a two-sided bootstrap p-value.

    Args:
      probs_a, probs_b: ``[R, N, C]`` class probabilities of the two arms (a: the
        regularised arm, b: the baseline), finite.
      labels: ``[N]`` integer labels.
      mask: optional bool ``[R]``: the replica pairs to use (True = keep), e.g. the replicas
        that stayed finite in both arms; at least 2.
      num_samples: bootstrap samples B.
      level: coverage of the central percentile interval.
      seed: seed (or seed sequence) of numpy's ``default_rng``; the result is a function of
        the inputs and the seed.

    Returns:
      ``{"num_replicas", "num_examples", "num_samples", "level", "test", metric: {"a", "b",
      "diff", "ci": [lo, hi], "p_value", "significant"}}`` for each metric of
      ``PAIRED_METRICS``. ``significant`` is True when the interval excludes 0. ``p_value`` is
      ``min(1, 2 (min(#{d <= 0}, #{d >= 0}) + 1) / (B' + 1))`` over the B' samples that define
      the metric: identical arms give d = 0 everywhere, an interval [0, 0] and p = 1.

    Raises:
      ValueError: mismatched shapes, fewer than 2 kept replicas, non-finite values, or a bad
        ``num_samples`` / ``level``.

    Example:
      >>> p = np.zeros((4, 3, 2)); p[..., 0] = [[.9], [.1], [.6], [.2]]; p[..., 1] = 1 - p[..., 0]
      >>> out = paired_bootstrap(p, p, np.zeros(3, int), num_samples=50)
      >>> out["pd_abs"]["diff"], out["pd_abs"]["p_value"], out["pd_abs"]["significant"]
      (0.0, 1.0, False)
    """
    pa, pb = np.asarray(probs_a), np.asarray(probs_b)
    labels = np.asarray(labels)
    if pa.ndim != 3 or pa.shape != pb.shape:
        raise ValueError(f"probs_a and probs_b must both have shape [R, N, C]; got {pa.shape} "
                         f"and {pb.shape}")
    if labels.shape != (pa.shape[1],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape [N] = ({pa.shape[1]},); got "
                         f"{labels.dtype} {labels.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (pa.shape[0],) or mask.dtype != bool:
            raise ValueError(f"mask must be a boolean array of shape [R] = ({pa.shape[0]},); "
                             f"got {mask.dtype} {mask.shape}")
        pa, pb = pa[mask], pb[mask]
    r, n = pa.shape[0], pa.shape[1]
    if r < 2:
        raise ValueError(f"the paired test needs at least 2 replicas in both arms; got {r}")
    if n < 1:
        raise ValueError("the paired test needs at least 1 example")
    if not (np.isfinite(pa).all() and np.isfinite(pb).all()):
        raise ValueError("probs_a and probs_b must be finite (mask out diverged replicas)")
    if not (is_int(num_samples) and num_samples >= 1):
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")

    tv_a, dis_a, cor_a = _pair_terms(pa, labels)
    tv_b, dis_b, cor_b = _pair_terms(pb, labels)
    d_tv, d_dis, d_cor = tv_a - tv_b, dis_a - dis_b, cor_a - cor_b
    first, second = np.triu_indices(r, 1)
    point = {
        "pd_abs": (tv_a.mean(), tv_b.mean()),
        "churn": (dis_a.mean(), dis_b.mean()),
        "acc_mean": (cor_a.mean(), cor_b.mean()),
    }
    point["eta"] = tuple(point["acc_mean"][i] - point["churn"][i] for i in range(2))

    seq = np.random.SeedSequence(list(seed) if isinstance(seed, Sequence) else seed)
    rng_replicas, rng_examples = (np.random.default_rng(s) for s in seq.spawn(2))
    samples: dict[str, list[np.ndarray]] = {k: [] for k in PAIRED_METRICS}
    for start in range(0, num_samples, _BATCH):
        b = min(_BATCH, num_samples - start)
        w_BxR = _counts(rng_replicas, b, r)
        v_BxN = _counts(rng_examples, b, n)
        w_BxP = w_BxR[:, first] * w_BxR[:, second]
        pairs_B = w_BxP.sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            tv = np.where(pairs_B > 0, ((v_BxN @ d_tv.T) * w_BxP).sum(-1) / (pairs_B * n),
                          np.nan)
            dis = np.where(pairs_B > 0, ((v_BxN @ d_dis.T) * w_BxP).sum(-1) / (pairs_B * n),
                           np.nan)
        acc = ((v_BxN @ d_cor.T) * w_BxR).sum(-1) / (r * n)
        for k, v in (("pd_abs", tv), ("churn", dis), ("acc_mean", acc), ("eta", acc - dis)):
            samples[k].append(v)

    out: dict[str, Any] = {
        "test": "paired two-way bootstrap (replicas and test examples, same draws for both "
                "arms); significant when the interval of the difference excludes 0",
        "num_replicas": int(r), "num_examples": int(n), "num_samples": int(num_samples),
        "level": float(level),
    }
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    for k in PAIRED_METRICS:
        d = np.concatenate(samples[k])
        d = d[np.isfinite(d)]
        a, b = (float(v) for v in point[k])
        if d.size == 0:
            ci, p = [math.nan, math.nan], math.nan
        else:
            ci = [float(np.percentile(d, lo_q)), float(np.percentile(d, hi_q))]
            tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
            p = min(1.0, 2.0 * (tail + 1) / (d.size + 1))
        out[k] = {"a": a, "b": b, "diff": a - b, "ci": ci, "p_value": p,
                  "significant": bool(d.size and (ci[0] > 0 or ci[1] < 0))}
    return out


# ---------------------------------------------------------------------------------------------
# Trials.


def _arms(config: RegularizersConfig) -> tuple[str, ...]:
    return (BASELINE,) + tuple(config.regularizers)


def _task(config: RegularizersConfig, num_classes: int, depth: int, optimizer: str,
          regularizer: str) -> engine.Task:
    """The task of one arm. Equal arguments give equal tasks (the MLP and loss are frozen
    dataclasses, the optimizer is cached), so compiled functions are shared."""
    model = models.MLP(
        widths=(config.width,) * depth, num_classes=num_classes,
        dropout_rate=config.dropout_rate if regularizer == "dropout" else 0.0,
        norm={"layernorm": "layer", "batchnorm": "batch"}.get(regularizer),
        residual=regularizer == "residual")
    kwargs = {"momentum": config.momentum} if optimizer == "momentum" else {}
    if regularizer == "weight_decay":
        kwargs["weight_decay"] = config.weight_decay
    tx = optim.optimizer(optimizer, config.learning_rate_of(optimizer), **kwargs)
    loss = engine.DEFAULT_LOSS
    if regularizer == "label_smoothing":
        loss = losses.label_smoothing(loss, config.label_smoothing)
    return engine.Task(model=model, tx=tx, loss_fn=loss)


def _dataset(config: RegularizersConfig) -> data.Dataset:
    return subset(data.load(config.dataset), config.num_train, config.num_test)


def _trial(config: RegularizersConfig, ds: data.Dataset, depth: int, optimizer: str,
           regularizer: str) -> Trial:
    return Trial(
        name=f"d{depth}/{optimizer}/{regularizer}",
        task=_task(config, ds.num_classes, depth, optimizer, regularizer),
        data=ds,
        fit=fit_config(config, config.vary),
        info={"depth": depth, "width": config.width, "optimizer": optimizer,
              "learning_rate": config.learning_rate_of(optimizer), "regularizer": regularizer,
              "vary": list(randomness.check_sources(config.vary)),
              "num_classes": ds.num_classes, "num_test": ds.num_test},
        evaluate=_evaluate_fn(config, depth, optimizer, regularizer),
    )


# Test predictions of the baselines, so that each regularised arm can be paired with its
# baseline: filled when a baseline is evaluated (it precedes its arms in the trial order).
# After an interruption between a baseline and its arms, the resumed process retrains the
# baseline (bitwise the same replicas: every draw derives from seed, source, replica, step).
_BASELINES: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_MAX_BASELINES = 32


def _remember(key: tuple, value: tuple[np.ndarray, np.ndarray]) -> None:
    _BASELINES[key] = value
    _BASELINES.move_to_end(key)
    while len(_BASELINES) > _MAX_BASELINES:
        _BASELINES.popitem(last=False)


def _baseline_predictions(trial: Trial) -> tuple[np.ndarray, np.ndarray]:
    key = _cache_key(trial)
    if key not in _BASELINES:
        run = engine.Engine(trial.task, trial.data, trial.fit).run()
        _remember(key, predict_finite(run, trial.data))
    return _BASELINES[key]


def _cache_key(trial: Trial) -> tuple:
    ds = trial.data
    return (trial.task, trial.fit, ds.name, ds.num_train, ds.num_test)


def _evaluate_fn(config: RegularizersConfig, depth: int, optimizer: str, regularizer: str):
    def evaluate_fn(run: engine.Run, ds: data.Dataset) -> dict:
        probs_RxNxC, keep = predict_finite(run, ds)
        out = evaluate_predictions(run, ds, probs_RxNxC, keep,
                                   key=jax.random.fold_in(jax.random.key(config.seed), 1),
                                   num_samples=config.num_samples, level=config.level)
        baseline = _trial(config, ds, depth, optimizer, BASELINE)
        # The baseline (retrained here on a resume) compiles as this run did.
        baseline = dataclasses.replace(baseline, fit=dataclasses.replace(
            baseline.fit, deterministic=run.config.deterministic))
        if regularizer == BASELINE:
            _remember(_cache_key(baseline), (probs_RxNxC, keep))
            return out
        base_probs, base_keep = _baseline_predictions(baseline)
        both = keep & base_keep
        if both.sum() < 2:
            out["paired"] = None
            out["paired_error"] = (f"only {int(both.sum())} replicas stayed finite in both this "
                                   "arm and the baseline; the paired test needs 2")
            return out
        out["paired"] = paired_bootstrap(
            probs_RxNxC, base_probs, ds.y_test, mask=both, num_samples=config.num_samples,
            level=config.level,
            seed=[config.seed, depth, optim.OPTIMIZERS.index(optimizer),
                  REGULARIZERS.index(regularizer)])
        out["paired"]["excluded"] = [int(i) for i in run.replica_ids[~both]]
        return out

    return evaluate_fn


def trials(config: RegularizersConfig) -> list[Trial]:
    ds = _dataset(config)
    require(config.batch_size <= ds.num_train, "batch_size",
            f"must be at most the {ds.num_train} training examples, got {config.batch_size}")
    return [_trial(config, ds, depth, optimizer, arm)
            for depth in config.depths for optimizer in config.optimizers
            for arm in _arms(config)]


# ---------------------------------------------------------------------------------------------
# Report.


def _name(depth: int, optimizer: str, arm: str) -> str:
    return f"d{depth}/{optimizer}/{arm}"


def _with_ci(m: Mapping[str, Any] | None, key: str) -> str:
    if not m:
        return "-"
    ci = m.get(key + "_ci")
    return fmt(m.get(key)) + ("" if ci is None else " " + fmt(ci))


def _paired(rec: Mapping[str, Any], metric: str) -> Mapping[str, Any] | None:
    p = rec.get("paired")
    return None if not p else p.get(metric)


def _verdict(p: Mapping[str, Any] | None, lower_is: str, higher_is: str) -> str:
    if p is None:
        return "-"
    if not p["significant"]:
        return "n.s."
    return lower_is if p["diff"] < 0 else higher_is


def _diff_cell(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "-"
    return f"{p['diff']:+.4f} {fmt(p['ci'], 4)}"


def _p_cell(p: Mapping[str, Any] | None) -> str:
    return "-" if p is None else fmt(p["p_value"], 3)


def report(config: RegularizersConfig, records, workdir: Path):
    pct = int(round(config.level * 100))
    vary = ", ".join(randomness.check_sources(config.vary)) or "nothing (control)"
    n_test = next(iter(records.values()))["info"]["num_test"]
    lr = ", ".join(f"{o} {config.learning_rate_of(o):g}" for o in config.optimizers)
    lines = [
        f"Each trial trains {config.replicas} replicas of a relu MLP of width {config.width} "
        f"and depth d (hidden layers) on {config.dataset} for {config.epochs} epochs (batch "
        f"{config.batch_size}; learning rates: {lr}); replicas differ in {vary}. Arms: "
        f"'{BASELINE}' (no regulariser) and one regulariser at a time: weight_decay (L2 "
        f"{config.weight_decay} added to the gradient, as PyTorch's weight_decay), dropout "
        f"(rate {config.dropout_rate}), layernorm / batchnorm (after each hidden Dense), "
        f"residual (skip connections around hidden layers 2..d), label_smoothing (epsilon "
        f"{config.label_smoothing}). Replica r of every arm of a (depth, optimizer) cell uses "
        f"the same keys, and all arms predict the same {n_test} test examples, so arms are "
        "paired.",
        "",
        "Metrics: acc_mean (mean test accuracy), churn (fraction of test examples on which two "
        "replicas disagree: the prediction difference of the seed repository), eta "
        "(Effective Test Accuracy = acc_mean - churn), pd_abs (mean total-variation distance "
        f"of two replicas' probabilities). Brackets: {pct}% bootstrap intervals over replicas "
        f"({config.num_samples} samples). pd_abs compares probabilities, so a regulariser that "
        "changes the networks' confidence (label smoothing, weight decay) moves it even where "
        "top-1 predictions agree as often; churn counts top-1 disagreements only.",
        "",
        "Paired test: for each regulariser, the difference regularised - baseline (same depth, "
        "same optimizer) of pd_abs and churn, by a paired two-way bootstrap that resamples the "
        "replicas and the test examples with the same draws for both arms "
        f"({config.num_samples} samples); a difference is significant when its {pct}% "
        "interval excludes 0 ('lower' = more reproducible than the baseline). p is the "
        "two-sided bootstrap p-value. No correction for multiple comparisons: with K tests, "
        f"about {100 - pct}% of K would be flagged by chance alone if no regulariser had an "
        "effect.",
        "",
    ]
    lines += _findings(config, records)
    for depth in config.depths:
        rows = []
        for optimizer in config.optimizers:
            for arm in _arms(config):
                rec = records[_name(depth, optimizer, arm)]
                m = rec.get("metrics")
                pd, ch = _paired(rec, "pd_abs"), _paired(rec, "churn")
                rows.append([optimizer, arm, _with_ci(m, "acc_mean"), _with_ci(m, "churn"),
                             _with_ci(m, "eta"), fmt(record_metric(rec, "pd_abs")),
                             _diff_cell(pd), _p_cell(pd), _verdict(pd, "lower", "higher"),
                             _diff_cell(ch), _p_cell(ch), _verdict(ch, "lower", "higher")])
        header = ["optimizer", "regularizer", "acc_mean", "churn", "eta", "pd_abs",
                  "d pd_abs [CI]", "p", "pd_abs vs base", "d churn [CI]", "p",
                  "churn vs base"]
        lines += [f"## Depth {depth}", "", markdown_table(header, rows), ""]
    _plot_metrics(workdir / "churn_eta.png", config, records)
    _plot_differences(workdir / "pd_difference.png", config, records)
    lines += [
        "![churn and eta per regulariser](churn_eta.png)",
        "",
        "churn_eta.png: churn (top) and Effective Test Accuracy (bottom) of every arm, one "
        f"panel per optimizer, bars per depth, with {pct}% bootstrap intervals.",
        "",
        "![paired differences of pd_abs](pd_difference.png)",
        "",
        "pd_difference.png: the paired difference of pd_abs (regularised - baseline) with its "
        f"{pct}% interval, one panel per optimizer, points per depth; filled markers are "
        "significant, hollow ones are not. Below 0: the regulariser made the replicas agree "
        "more.",
        "",
    ]
    return lines


def _tally(config: RegularizersConfig, records, reg: str, metric: str, *,
           learned_only: bool = False):
    """Cells where ``reg`` makes ``metric`` significantly lower / higher than the baseline,
    the count of the others, and every cell's difference; ``learned_only``: only cells where
    both arms learned (mean accuracy above 1.5 times chance)."""
    lower, higher, ns, diffs = [], [], 0, []
    for depth in config.depths:
        for optimizer in config.optimizers:
            rec = records[_name(depth, optimizer, reg)]
            p = _paired(rec, metric)
            if p is None or (learned_only and not (
                    _learned(rec) and _learned(records[_name(depth, optimizer, BASELINE)]))):
                continue
            diffs.append(p["diff"])
            if not p["significant"]:
                ns += 1
            else:
                (lower if p["diff"] < 0 else higher).append(f"d{depth}/{optimizer}")
    return lower, higher, ns, diffs


def _cells(cells: list[str]) -> str:
    return f" ({', '.join(cells)})" if cells else ""


def _findings(config: RegularizersConfig, records) -> list[str]:
    out = ["- Per regulariser, against its baseline in each (depth, optimizer) cell: 'lower' "
           "and 'higher' count significant paired differences, n.s. the others."]
    totals = {m: [0, 0, 0] for m in ("pd_abs", "churn")}  # lower, higher, tested
    for reg in config.regularizers:
        parts = []
        for metric in ("pd_abs", "churn"):
            lower, higher, ns, diffs = _tally(config, records, reg, metric)
            if not diffs:
                continue
            t = totals[metric]
            t[0], t[1], t[2] = t[0] + len(lower), t[1] + len(higher), t[2] + len(diffs)
            parts.append(f"{metric} lower in {len(lower)} of {len(diffs)} cells{_cells(lower)}"
                         f", higher in {len(higher)}{_cells(higher)}, n.s. in {ns} (mean "
                         f"difference {np.mean(diffs):+.4f})")
        if not parts:
            out.append(f"- {reg}: no paired comparison (too many replicas diverged).")
            continue
        eta = _tally(config, records, reg, "eta")[3]
        out.append(f"- {reg}: " + "; ".join(parts)
                   + (f"; mean change of eta {np.mean(eta):+.4f}" if eta else "") + ".")
    share = 1 - config.level
    for metric, (lower, higher, tested) in totals.items():
        if not tested:
            continue
        tallies = [_tally(config, records, r, metric, learned_only=True)
                   for r in config.regularizers]
        l_low, l_high, l_tested = (sum(len(t[i]) for t in tallies) for i in (0, 1, 3))
        chance = l_tested * share
        if l_low > chance and l_low >= 2 * max(l_high, 1):
            verdict = ("mostly lower: the regularisers tend to make predictions more "
                       "reproducible, as the seed repository's hypothesis expects")
        elif l_high > chance and l_high >= 2 * max(l_low, 1):
            verdict = "mostly higher: the regularisers tend to make predictions less reproducible"
        else:
            verdict = ("mixed: no consistent effect, against the hypothesis that regularisers "
                       "make predictions more reproducible; the sign depends on the regulariser, "
                       "the depth and the optimizer")
        out.append(f"- Overall {metric}: {lower} of {tested} comparisons significantly lower, "
                   f"{higher} significantly higher; of the {l_tested} where both arms learned, "
                   f"{l_low} lower and {l_high} higher (chance alone would flag about "
                   f"{chance:.1f} in total): {verdict}.")
    base = []
    for depth in config.depths:
        churns = [record_metric(records[_name(depth, o, BASELINE)], "churn")
                  for o in config.optimizers]
        accs = [record_metric(records[_name(depth, o, BASELINE)], "acc_mean")
                for o in config.optimizers]
        pairs = zip(config.optimizers, churns, strict=True)
        base.append(f"depth {depth}: churn " + ", ".join(f"{o} {fmt(c)}" for o, c in pairs)
                    + " (acc " + ", ".join(fmt(a) for a in accs) + ")")
    out.append("- Baselines: " + "; ".join(base) + ".")
    stuck = [name for name, rec in records.items()
             if rec.get("metrics") and _near_chance(rec)]
    if stuck:
        out.append("- Near chance accuracy (mean accuracy below 1.5 times chance: the replicas "
                   "barely learned, so their churn measures untrained networks; comparisons "
                   "with them are left out of the 'both arms learned' counts): "
                   + ", ".join(stuck) + ".")
    return ["Findings:", ""] + out + [""]


def _near_chance(rec: Mapping[str, Any]) -> bool:
    return rec["metrics"]["acc_mean"] < 1.5 / rec["info"]["num_classes"]


def _learned(rec: Mapping[str, Any]) -> bool:
    return bool(rec.get("metrics")) and not _near_chance(rec)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily; Agg canvas; atomic writes).


def _err(center: float, ci) -> list[list[float]]:
    if not ci or any(v is None for v in ci) or not math.isfinite(center):
        return [[0.0], [0.0]]
    return [[max(center - float(ci[0]), 0.0)], [max(float(ci[1]) - center, 0.0)]]


def _plot_metrics(path: Path, config: RegularizersConfig, records) -> Path:
    arms = _arms(config)
    fig, axes = plots.figure(len(config.optimizers), nrows=2,
                             width=max(4.5, 0.75 * len(arms) + 1.5), height=3.2)
    width = 0.8 / len(config.depths)
    for col, optimizer in enumerate(config.optimizers):
        for row, metric in enumerate(("churn", "eta")):
            ax = axes[row][col]
            for i, depth in enumerate(config.depths):
                for j, arm in enumerate(arms):
                    m = records[_name(depth, optimizer, arm)].get("metrics") or {}
                    v = m.get(metric)
                    if v is None:
                        continue
                    x = j + (i - (len(config.depths) - 1) / 2) * width
                    ax.bar([x], [v], width=width, color=f"C{i}",
                           label=f"depth {depth}" if j == 0 else None,
                           yerr=_err(v, m.get(metric + "_ci")), capsize=2)
            ax.set_xticks(range(len(arms)), list(arms), rotation=35, ha="right")
            ax.set_title(f"{metric} ({optimizer})")
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel(metric)
            if row == 0 and col == 0 and len(config.depths) > 1:
                ax.legend(fontsize="small")
    fig.suptitle(f"Churn and Effective Test Accuracy per regulariser\n({config.dataset}, "
                 f"width {config.width}, R={config.replicas})", fontsize="medium")
    return plots.save(fig, path)


def _plot_differences(path: Path, config: RegularizersConfig, records) -> Path:
    regs = list(config.regularizers)
    fig, axes = plots.figure(len(config.optimizers), nrows=1,
                             width=max(4.5, 0.75 * len(regs) + 1.5), height=3.6)
    width = 0.8 / len(config.depths)
    for col, optimizer in enumerate(config.optimizers):
        ax = axes[col]
        for i, depth in enumerate(config.depths):
            for j, reg in enumerate(regs):
                p = _paired(records[_name(depth, optimizer, reg)], "pd_abs")
                if p is None:
                    continue
                x = j + (i - (len(config.depths) - 1) / 2) * width
                ax.errorbar([x], [p["diff"]], yerr=_err(p["diff"], p["ci"]), fmt="o",
                            color=f"C{i}", mfc=f"C{i}" if p["significant"] else "white",
                            capsize=2, label=f"depth {depth}" if j == 0 else None)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(regs)), regs, rotation=35, ha="right")
        ax.set_title(optimizer)
        ax.grid(axis="y", alpha=0.3)
        if col == 0:
            ax.set_ylabel("pd_abs: regularised - baseline")
            if len(config.depths) > 1:
                ax.legend(fontsize="small")
    fig.suptitle("Paired difference of pd_abs against the baseline\n(filled: significant, "
                 f"{int(round(config.level * 100))}% intervals)", fontsize="medium")
    return plots.save(fig, path)


register(RegularizersConfig, "Do regularisers improve reproducibility?", trials, report)
