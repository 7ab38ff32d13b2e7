"""The regulariser study: do common regularisers make MLPs more reproducible?

After apurvakokate/Reproducibility ("Do regularizers improve reproducibility?", PyTorch MLPs):
train replica sets of MLPs of one width and several depths, with no regulariser (the baseline)
and with one regulariser at a time (weight decay, dropout, LayerNorm, BatchNorm, residual
connections, label smoothing), under each optimizer (SGD, SGD with momentum, Adam), and compare
accuracy, churn (the seed repository's prediction difference) and Effective Test Accuracy
(``eta`` = mean accuracy - churn). Each regularised arm is compared with its baseline (same
depth, same optimizer) by ``metrics.difference``, paired, resampling replicas and test examples.

**Pairing.** Replica r of every arm of one (depth, optimizer) cell uses the same keys (same
seed, same replica ids, same varied sources): the same initial weights of the shared Dense
layers (Flax derives a layer's key from its name, so a LayerNorm or BatchNorm layer does not
shift them), the same data order and the same dropout keys; and every arm predicts the same
test examples. Replicas that diverged in either arm are left out of the comparison in both.

**The test: a paired two-way bootstrap** (``metrics.difference(paired=True, over="both")``).
PD is a mean over replica pairs and test examples, so its uncertainty has two sources: having
trained only R replicas, and having only N test examples. Each bootstrap sample draws replica
and example multiplicities, the same for both arms, and the difference is regularised minus
baseline, with its central ``level`` interval and two-sided bootstrap p-value. Resampling
replicas keeps the run-to-run uncertainty in, resampling examples keeps the finite test set
in, and the shared draws keep the pairing. The two-way bootstrap of a crossed design is
somewhat conservative (McCullagh 2000), which errs on the side of "not significant".

**Many comparisons.** Every (depth, optimizer) cell tests every regulariser, so each metric's
p-values get Holm's correction over all of the study's comparisons (``stats.holm``, the
project's choice: the report calls single cells lower or higher, a family-wise claim), and a
cell is significant when its adjusted p-value ``p_holm`` is at most 1 - ``level``. A bootstrap
p-value is at least 2 / (num_samples + 1), so with K comparisons no cell can be significant
unless num_samples >= 2 K / (1 - level) - 1; the report says so when that bites.

**Verdicts** rest on pooled effects, not on counts of significant cells (a count jumps when one
cell's interval crosses 0, which a last-bit rounding difference between machines can do):
``summarise`` gives, per regulariser and over all of them, the mean regularised-minus-baseline
difference over the cells where both arms learned, with a cluster-bootstrap interval over the
(depth, optimizer) cells (``stats.pooled_difference``; the regularisers of one cell share its
baseline, so a cell is resampled whole). It is a function of the records alone, so a report
re-rendered from results.json gives the same numbers.

**The source repository's tests** (scipy's Wilcoxon signed-rank test, two-sided, defaults).
``ex_mlp.py`` tests, per trained configuration, whether the R(R-1)/2 pairwise prediction
differences of its runs (churn of each pair) have median 0: ``source_wilcoxon`` of every arm.
That asks whether replicas disagree at all, not whether a regulariser changes how much, and
its pairs share replicas (not independent). ``wilcoxon`` of a regularised arm compares arms:
per test example, pd_abs (and churn) averaged over the replica pairs, regularised against
baseline, paired by example, over the replicas finite in both. It conditions on the R trained
replicas (its only randomness is the test examples), so it understates the run-to-run
uncertainty with R = 8 and is reported beside the bootstrap, not instead of it. The binary
``experiments/regularizers.py`` is flags over ``RegularizersConfig``; the report is
``regularizers_report.render``.

References:
  apurvakokate/Reproducibility (README and ``ex_mlp.py``: Effective Test Accuracy, the Wilcoxon
  test); methods.md sections 4-5; Efron & Tibshirani 1993; McCullagh 2000 (Bernoulli 6(2));
  Holm 1979; Wilcoxon 1945.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxrepro import data, engine, losses, metrics, models, optim, randomness
from jaxrepro.studies import stats
from jaxrepro.studies.base import (
    StudyConfig,
    bootstrap_kwargs,
    check_choice,
    check_choices,
    check_int,
    check_level,
    check_number,
    check_sources,
    check_unique,
    fit_config,
    flag_field,
    load_dataset,
    require,
)
from jaxrepro.studies.runner import Analysis, Trial, record
from jaxrepro.studies.workdir import Predictions

TITLE = "Do regularisers improve reproducibility?"

BASELINE = "none"
"""The arm with no regulariser, trained in every (depth, optimizer) cell."""

REGULARIZERS = ("weight_decay", "dropout", "layernorm", "batchnorm", "residual", "label_smoothing")
"""The regularisers, each switched on alone against the baseline."""

DATASETS = ("mnist1d", "digits")

PAIRED_METRICS = ("pd_abs", "churn", "acc_mean", "eta")
"""Metrics whose regularised-minus-baseline difference is recorded."""

WILCOXON_METRICS = ("pd_abs", "churn")
"""Per-example prediction differences whose arms the Wilcoxon test compares."""

LEARNED = 1.5
"""A trial learned when its mean test accuracy is at least this many times chance; pooled
effects use the cells where both arms learned."""


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

    replicas: int = flag_field(
        16, "replicas per trial (>= 2; 16: the verdicts hold under a change of rounding)"
    )
    epochs: int = flag_field(15, "training epochs")
    dataset: str = flag_field("mnist1d", "dataset: mnist1d or digits")
    depths: tuple[int, ...] = flag_field((2, 6, 20), "MLP depths (number of hidden layers)")
    width: int = flag_field(128, "width of every hidden layer")
    regularizers: tuple[str, ...] = flag_field(
        REGULARIZERS,
        "regularisers, each tested alone against the baseline (always trained): "
        + ", ".join(REGULARIZERS),
    )
    optimizers: tuple[str, ...] = flag_field(
        optim.OPTIMIZERS, "optimizers: sgd, momentum (SGD with heavy-ball momentum), adam"
    )
    sgd_learning_rate: float = flag_field(0.3, "learning rate of plain SGD")
    momentum_learning_rate: float = flag_field(0.03, "learning rate of SGD with momentum")
    adam_learning_rate: float = flag_field(3e-3, "learning rate of Adam")
    momentum: float = flag_field(0.9, "momentum coefficient of the momentum optimizer")
    weight_decay: float = flag_field(
        5e-4,
        "L2 weight decay of the weight_decay arm (added to "
        "the gradient, as PyTorch's weight_decay)",
    )
    dropout_rate: float = flag_field(0.1, "dropout rate of the dropout arm")
    label_smoothing: float = flag_field(0.1, "epsilon of the label_smoothing arm")
    vary: tuple[str, ...] = flag_field(
        ("init", "order"),
        "sources of randomness that differ between replicas: "
        + ", ".join(randomness.SOURCES)
        + " or all (empty: the control, identical replicas)",
    )
    num_samples: int = flag_field(1000, "bootstrap samples of the intervals and paired tests")
    level: float = flag_field(0.95, "confidence level of the intervals and the paired tests")

    def check(self):
        check_int("width", self.width)
        check_int("num_samples", self.num_samples)
        check_choice("dataset", self.dataset, DATASETS)
        check_unique("depths", self.depths)
        for d in self.depths:
            check_int("depths", d)  # hidden layers
        require(
            BASELINE not in self.regularizers,
            "regularizers",
            f"{BASELINE!r} is the baseline, always trained; list only regularisers",
        )
        check_choices("regularizers", self.regularizers, REGULARIZERS, "regulariser")
        check_choices("optimizers", self.optimizers, optim.OPTIMIZERS, "optimizer")
        for name in ("sgd_learning_rate", "momentum_learning_rate", "adam_learning_rate"):
            check_number(name, getattr(self, name), strict=True)
        for name in ("momentum", "dropout_rate", "label_smoothing"):
            check_number(name, getattr(self, name), below=1.0)
        check_number("weight_decay", self.weight_decay)
        require(
            len(set(self.vary)) == len(self.vary), "vary", f"has duplicates: {list(self.vary)!r}"
        )
        check_sources("vary", self.vary)
        check_level("level", self.level)

    def learning_rate_of(self, optimizer: str) -> float:
        """The learning rate flag of ``optimizer``."""
        return getattr(self, f"{optimizer}_learning_rate")


def arms(config: RegularizersConfig) -> tuple[str, ...]:
    return (BASELINE,) + tuple(config.regularizers)


def trial_name(depth: int, optimizer: str, arm: str) -> str:
    return f"d{depth}/{optimizer}/{arm}"


def _task(
    config: RegularizersConfig, num_classes: int, depth: int, optimizer: str, regularizer: str
) -> engine.Task:
    """The task of one arm. Equal arguments give equal tasks (the MLP and loss are frozen
    dataclasses, the optimizer is cached), so compiled functions are shared."""
    model = models.MLP(
        widths=(config.width,) * depth,
        num_classes=num_classes,
        dropout_rate=config.dropout_rate if regularizer == "dropout" else 0.0,
        norm={"layernorm": "layer", "batchnorm": "batch"}.get(regularizer),
        residual=regularizer == "residual",
    )
    kwargs = {"momentum": config.momentum} if optimizer == "momentum" else {}
    if regularizer == "weight_decay":
        kwargs["weight_decay"] = config.weight_decay
    tx = optim.optimizer(optimizer, config.learning_rate_of(optimizer), **kwargs)
    loss = engine.DEFAULT_LOSS
    if regularizer == "label_smoothing":
        loss = losses.label_smoothing(loss, config.label_smoothing)
    return engine.Task(model=model, tx=tx, loss_fn=loss)


def _trial(
    config: RegularizersConfig, ds: data.Dataset, depth: int, optimizer: str, regularizer: str
) -> Trial:
    return Trial(
        name=trial_name(depth, optimizer, regularizer),
        task=_task(config, ds.num_classes, depth, optimizer, regularizer),
        data=ds,
        fit=fit_config(config, config.vary),
        info={
            "depth": depth,
            "width": config.width,
            "optimizer": optimizer,
            "learning_rate": config.learning_rate_of(optimizer),
            "regularizer": regularizer,
            "vary": list(randomness.check_sources(config.vary)),
            "num_classes": ds.num_classes,
            "num_test": ds.num_test,
        },
    )


def trials(config: RegularizersConfig) -> list[Trial]:
    ds = load_dataset(config.dataset, config.num_train, config.num_test)
    require(
        config.batch_size <= ds.num_train,
        "batch_size",
        f"must be at most the {ds.num_train} training examples, got {config.batch_size}",
    )
    return [
        _trial(config, ds, depth, optimizer, arm)
        for depth in config.depths
        for optimizer in config.optimizers
        for arm in arms(config)
    ]


def paired(config: RegularizersConfig, arm: Predictions, base: Predictions) -> dict[str, Any]:
    """The paired two-way bootstrap of arm minus baseline (``PAIRED_METRICS``) and the
    per-example Wilcoxon test (``WILCOXON_METRICS``), over the replicas finite in both
    (``excluded``: the others), or None for both with ``paired_error``. ``p_holm`` is added
    by :func:`analyse`, which sees every comparison."""
    both = arm.keep & base.keep
    if both.sum() < 2:
        return {
            "paired": None,
            "wilcoxon": None,
            "paired_error": f"only {int(both.sum())} replicas stayed "
            "finite in both this arm and the baseline; the paired test needs 2",
        }
    kw = bootstrap_kwargs(config, paired=True, over="both", mask=both)
    out = metrics.difference(arm.probs, base.probs, arm.labels, **kw)
    out = {
        "test": "paired two-way bootstrap (replicas and test examples, same draws for both "
        "arms); 'significant': the interval excludes 0 (uncorrected); the report's flags use "
        "the Holm-adjusted p-value: p_holm <= 1 - level",
        **{k: v for k, v in out.items() if not isinstance(v, dict) or k in PAIRED_METRICS},
    }
    out["excluded"] = [int(i) for i in arm.replica_ids[~both]]
    a, b = stats.per_example(arm.probs, both), stats.per_example(base.probs, both)
    wil = {
        "test": "Wilcoxon signed-rank (scipy, two-sided) of the per-example mean over "
        "replica pairs, regularised - baseline, paired by test example; conditions on the "
        "trained replicas",
        **{m: stats.wilcoxon(a[m], b[m]) for m in WILCOXON_METRICS},
    }
    return {"paired": out, "wilcoxon": wil}


def source_wilcoxon(pred: Predictions) -> dict[str, Any] | None:
    """The source repository's test of one arm (``ex_mlp.py``: ``wilcoxon(pdiff_mets)``):
    the signed-rank test of its replicas' pairwise churns against a median of 0; None with
    fewer than 2 finite replicas."""
    if pred.keep.sum() < 2:
        return None
    return {
        "test": "Wilcoxon signed-rank (scipy, two-sided) of the churn of every pair of "
        "replicas against median 0 (apurvakokate/Reproducibility ex_mlp.py)",
        **stats.wilcoxon(stats.pairwise_churn(pred.probs, pred.keep)),
    }


def learned(rec: Mapping[str, Any]) -> bool:
    """Whether a trial's replicas learned: mean test accuracy at least ``LEARNED`` times
    chance (below it, churn measures barely trained networks)."""
    m = rec.get("metrics")
    return (
        bool(m)
        and m["acc_mean"] is not None
        and (m["acc_mean"] >= LEARNED / rec["info"]["num_classes"])
    )


def _adjust(entries: list[Mapping[str, Any]]) -> None:
    """Adds ``p_holm`` (``stats.holm`` over ``entries``, one family) to each entry."""
    for entry, p in zip(entries, stats.holm([e["p_value"] for e in entries]), strict=True):
        entry["p_holm"] = float(p)


def analyse(config: RegularizersConfig, predictions: Mapping[str, Predictions]) -> Analysis:
    """Per trial ``metrics.compare`` with intervals over replicas and the source repository's
    test; per regularised arm the paired tests against its cell's baseline, with Holm-adjusted
    p-values over all of the study's comparisons (one family per metric and test)."""
    kw = bootstrap_kwargs(config)
    records = {}
    for name, pred in predictions.items():
        records[name] = record(pred, **kw)
        records[name]["source_wilcoxon"] = source_wilcoxon(pred)
        info = pred.info
        if info["regularizer"] != BASELINE:
            base = predictions[trial_name(info["depth"], info["optimizer"], BASELINE)]
            records[name].update(paired(config, pred, base))
    _adjust([r["source_wilcoxon"] for r in records.values() if r["source_wilcoxon"]])
    tested = [r for r in records.values() if r.get("paired")]
    for metric in PAIRED_METRICS:
        _adjust([r["paired"][metric] for r in tested])
    for metric in WILCOXON_METRICS:
        _adjust([r["wilcoxon"][metric] for r in tested])
    return Analysis(records=records)


def summarise(config: RegularizersConfig, records: Mapping[str, Mapping[str, Any]]) -> dict:
    """The study's verdict numbers, from the records alone (as saved in results.json).

    For each regulariser and each metric of ``PAIRED_METRICS``: the pooled difference
    (regularised - baseline, ``stats.pooled_difference``) over the cells where both arms
    learned, with its cluster-bootstrap interval, and the cells where the paired test is
    significant after Holm (``lower`` / ``higher``). ``overall``: the same over every
    regulariser's comparisons at once, resampling (depth, optimizer) cells whole (they share
    the baseline). Draws: ``fold_in(bootstrap_key(seed), stats.POOLED_STREAM)``. ``left_out``:
    the tested comparisons where an arm did not learn; ``min_clusters``: the fewest cells an
    interval needs; ``family``: the Holm family size per metric; ``min_p``: the smallest
    bootstrap p-value, 2 / (num_samples + 1)."""
    alpha = 1 - config.level
    key = randomness.bootstrap_key(config.seed, stats.POOLED_STREAM)
    kw = dict(num_samples=config.num_samples, level=config.level)
    per_reg, left_out, family = {}, [], 0
    pooled: dict[str, list] = {m: [] for m in PAIRED_METRICS}  # (value, cell) over all
    for reg in config.regularizers:
        cells, entries = [], {m: [] for m in PAIRED_METRICS}
        for depth in config.depths:
            for optimizer in config.optimizers:
                rec = records[trial_name(depth, optimizer, reg)]
                if not rec.get("paired"):
                    continue
                family += 1
                cell = f"d{depth}/{optimizer}"
                if not (learned(rec) and learned(records[trial_name(depth, optimizer, BASELINE)])):
                    left_out.append(trial_name(depth, optimizer, reg))
                    continue
                cells.append(cell)
                for m in PAIRED_METRICS:
                    entries[m].append(rec["paired"][m])
                    pooled[m].append((rec["paired"][m]["diff"], cell))
        per_reg[reg] = {
            m: {
                **stats.pooled_difference([e["diff"] for e in es], cells, key, **kw),
                **{
                    side: [
                        c
                        for c, e in zip(cells, es, strict=True)
                        if stats.holm_verdict(e, alpha) == side
                    ]
                    for side in ("lower", "higher")
                },
            }
            for m, es in entries.items()
        }
    overall = {
        m: stats.pooled_difference([v for v, _ in vs], [c for _, c in vs], key, **kw)
        for m, vs in pooled.items()
    }
    return {
        "regularizers": per_reg,
        "overall": overall,
        "left_out": left_out,
        "min_clusters": stats.min_clusters(config.level),
        "family": family,
        "alpha": alpha,
        "min_p": 2 / (config.num_samples + 1),
    }
