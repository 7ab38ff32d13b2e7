"""The anti-distillation study's report: per dataset a table of every trial with intervals,
a table of differences (against the plain ensemble, paired; against the independent ensembles,
unpaired) with verdicts after Holm's correction, computed findings whose overall verdict
follows from a pooled difference and its interval (``anti_distillation.summarise``), and plots
against lambda, against the ensemble size and of the components' correlation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxrepro import plots
from jaxrepro.studies.anti_distillation import (
    REPORT_METRICS,
    ensemble_name,
    num,
    single_name,
    summarise,
    variants,
)
from jaxrepro.studies.render import (
    diff_text,
    fmt,
    markdown_table,
    pooled_text,
    with_ci,
)
from jaxrepro.studies.render import metric as value
from jaxrepro.studies.stats import holm_verdict


def _curve_row(record: Mapping[str, Any], k: int) -> dict | None:
    for row in record.get("ensemble_curve") or []:
        if row["k"] == k:
            return row
    return None


def _differences(config, records, dataset) -> dict[tuple[int, str], dict[str, Any]]:
    """(K, variant) -> {"vs_plain": ..., "vs_independent": ...}, as the analysis recorded."""
    return {
        (k, variant): records[ensemble_name(dataset, k, variant)].get("differences") or {}
        for k in config.ks
        for variant, _, _ in variants(config)
        if records[ensemble_name(dataset, k, variant)].get("metrics") is not None
    }


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    overview = summarise(config, records)
    alpha = overview["alpha"]
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
        "interval and two-sided bootstrap p-value; anti-distilled against plain ensemble of "
        "the same K is paired (replica r of both trials shares its initial keys and data "
        "order; replicas are resampled together), against the independent ensembles of k = K "
        "unpaired. A difference is lower or higher when its p-value, Holm-adjusted over the "
        f"{overview['family']['vs_plain']} comparisons against plain ensembles (and, "
        f"separately, the {overview['family']['vs_independent']} against independent "
        f"ensembles) of that metric, is at most {fmt(overview['alpha'], 2)}."
        + _floor_note(config, overview),
        "",
    ]
    summary, diff_lines, points = [], [], []
    for dataset in config.datasets:
        diffs = _differences(config, records, dataset)
        lines += _dataset_section(config, records, dataset, diffs, alpha)
        summary += _summary(config, records, dataset, diffs, alpha)
        for k in config.ks:
            for variant, _, _ in variants(config):
                comp = records[ensemble_name(dataset, k, variant)].get("components")
                if comp:
                    points.append(
                        {
                            "group": f"{dataset} K={k}",
                            "series": variant,
                            "x": comp["train"][f"corr_{config.ad_output}"],
                            "y": comp["test"][f"corr_{config.ad_output}"],
                        }
                    )
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
    plots.scatter_intervals(
        workdir / "component_correlation.png",
        points,
        xlabel=f"mean correlation of component {config.ad_output}, training set",
        ylabel=f"mean correlation of component {config.ad_output}, test set",
        title="Do components stay decorrelated on held-out data?",
    )
    summary.append(_overall(config, overview))
    return (
        ["## Findings", ""]
        + summary
        + [""]
        + lines
        + diff_lines
        + [
            "![component correlation](component_correlation.png)",
            "",
            "Each point is an ensemble trial: the mean correlation between its components' "
            f"{config.ad_output} (the penalised output) on the training set (x) and the test set "
            "(y). Points near the diagonal decorrelate "
            "as much on held-out data as on training data; points above it are less diverse on "
            "the test set than training suggests (Jeffares et al. 2023).",
            "",
        ]
    )


def _dataset_section(config, records, dataset, diffs, alpha) -> list[str]:
    single = records[single_name(dataset)]
    out_key = f"corr_{config.ad_output}"
    header = (
        ["trial", "K", "lambda / alpha"]
        + list(REPORT_METRICS)
        + [
            f"corr {config.ad_output} test / train",
            "corr centred test",
            "comp. disagree",
            "comp. acc",
        ]
    )
    rows = [
        ["single", 1, "-"] + [with_ci(single.get("metrics"), m) for m in REPORT_METRICS] + ["-"] * 4
    ]
    for k in config.ks:
        row = _curve_row(single, k)
        rows.append(
            [f"k={k} indep.", k, "-"] + [with_ci(row, m) for m in REPORT_METRICS] + ["-"] * 4
        )
    for k in config.ks:
        for variant, kind, weight in variants(config):
            rec = records[ensemble_name(dataset, k, variant)]
            comp = rec.get("components") or {}
            test, train = comp.get("test") or {}, comp.get("train") or {}
            rows.append(
                [variant, k, num(weight) if kind != "plain" else "0"]
                + [with_ci(rec.get("metrics"), m) for m in REPORT_METRICS]
                + [
                    f"{fmt(test.get(out_key))} / {fmt(train.get(out_key))}",
                    fmt(test.get("corr_centred_logits")),
                    fmt(test.get("disagreement")),
                    fmt(test.get("component_acc")),
                ]
            )
    n_test = single["info"]["num_test"]
    n_train = single["info"]["num_train"]
    out = [
        f"## {dataset} ({n_train} training, {n_test} test examples)",
        "",
        markdown_table(header, rows),
        "",
    ]
    drows = []
    for (k, variant), entry in diffs.items():
        vp, vi = entry.get("vs_plain"), entry.get("vs_independent")
        drows.append(
            [
                f"K={k} {variant}",
                diff_text(vp, "pd_abs") if vp else "-",
                diff_text(vp, "churn") if vp else "-",
                diff_text(vp, "acc_mean") if vp else "-",
                _p_text(vp, "pd_abs"),
                holm_verdict(vp["pd_abs"], alpha) if vp else "-",
                diff_text(vi, "pd_abs") if vi else "-",
                diff_text(vi, "churn") if vi else "-",
                _p_text(vi, "pd_abs"),
                holm_verdict(vi["pd_abs"], alpha) if vi else "-",
            ]
        )
    out += [
        f"Differences on {dataset}: the trial minus the plain ensemble of the same K (paired), "
        "and minus the independent ensembles of k = K (unpaired); p / p Holm: the pd_abs "
        "difference's bootstrap p-value, raw and Holm-adjusted; 'pd_abs' says whether the "
        "trial's pd_abs is lower, higher or not distinguishable after Holm's correction.",
        "",
        markdown_table(
            [
                "trial",
                "d pd_abs vs plain",
                "d churn vs plain",
                "d acc vs plain",
                "p / p Holm",
                "pd_abs vs plain",
                "d pd_abs vs indep.",
                "d churn vs indep.",
                "p / p Holm",
                "pd_abs vs indep.",
            ],
            drows,
        ),
        "",
    ]
    return out


def _p_text(d: Mapping[str, Any] | None, key: str) -> str:
    """``p / p Holm`` of the metric ``key`` of a difference."""
    if not d or not d.get(key):
        return "-"
    return f"{fmt(d[key]['p_value'], 3)} / {fmt(d[key].get('p_holm'), 3)}"


def _diff_p(d: Mapping[str, Any], key: str) -> str:
    """``diff [lo, hi], p Holm p``: a difference with its Holm-adjusted p-value, which decides
    the words around it."""
    return f"{diff_text(d, key)}, p Holm {fmt(d[key].get('p_holm'), 3)}"


def _floor_note(config, overview: Mapping[str, Any]) -> str:
    """A sentence when the bootstrap p-values are too coarse for Holm's correction to flag any
    comparison of the larger family."""
    alpha, min_p = overview["alpha"], overview["min_p"]
    k = max(overview["family"].values())
    if k == 0 or min_p * k <= alpha:
        return ""
    return (
        f" With {config.num_samples} bootstrap samples the smallest p-value is "
        f"{fmt(min_p, 4)}, so in a family of {k} comparisons Holm's correction can flag none "
        f"(it needs p <= {fmt(alpha / k, 5)}; num_samples >= {math.ceil(2 * k / alpha - 1)} "
        "would allow it)."
    )


def _overall(config, overview: Mapping[str, Any]) -> str:
    """The overall line: pooled differences of the anti-distilled trials with their intervals
    (the verdict), and the counts of Holm verdicts."""
    plain, indep = overview["vs_plain"], overview["vs_independent"]
    counts = plain["pd_abs"]["verdicts"]
    total = sum(counts.values())
    pct = int(round(config.level * 100))
    text = (
        f"- Overall: {total} anti-distilled ensembles (dataset x K x lambda) in "
        f"{plain['pd_abs']['num_clusters']} (dataset, K) groups. pd_abs minus the plain "
        f"ensemble of the same K: {pooled_text(plain['pd_abs'], unit='groups')}"
    )
    if indep["pd_abs"]["num_comparisons"]:
        text += (
            "; minus the independent ensembles of k = K (equal compute): "
            f"{pooled_text(indep['pd_abs'], unit='groups')}"
        )
    text += (
        f". Criterion: the {pct}% cluster-bootstrap interval (groups resampled whole, expanded "
        "percentile interval) of the mean difference over the anti-distilled ensembles "
        f"excludes 0 (at least {overview['min_clusters']} groups). After Holm's correction, "
        f"{counts['lower']} have a pd_abs lower than the plain ensemble "
        f"({plain['lower_clean']} of them with churn not higher and accuracy not lower), "
        f"{counts['higher']} higher, {counts['no difference']} not distinguishable"
        + (f", {counts['undefined']} undefined" if counts["undefined"] else "")
        + f"; {indep['pd_abs']['verdicts']['lower']} are lower than the independent ensembles"
        " (these counts do not decide the verdict)."
    )
    return text


def _costs(d: Mapping[str, Any], alpha: float) -> list[str]:
    """What a pd_abs reduction cost, from a ``difference`` (after Holm): higher churn, lower
    accuracy (a flatter, less accurate prediction also has a smaller pd_abs)."""
    out = []
    if holm_verdict(d["churn"], alpha) == "higher":
        out.append("higher churn")
    if holm_verdict(d["acc_mean"], alpha) == "lower":
        out.append("lower accuracy")
    return out


def _phrase(verdict: str) -> str:
    return {
        "lower": "lower than",
        "higher": "higher than",
        "no difference": "not distinguishable from",
    }.get(verdict, "undefined against")


def _summary(config, records, dataset, diffs, alpha) -> list[str]:
    """Findings sentences of one dataset (verdicts after Holm's correction)."""
    out = []
    single = records[single_name(dataset)]
    for k in config.ks:
        plain = records[ensemble_name(dataset, k, "plain")]
        indep = _curve_row(single, k)
        ad = {
            v: e
            for (kk, v), e in diffs.items()
            if kk == k and v.startswith("ad-") and "vs_plain" in e
        }
        text = (
            f"- {dataset}, K={k}: pd_abs of the single model "
            f"{fmt(value(single, 'pd_abs'))}, of independent ensembles of {k} "
            f"{fmt(indep['pd_abs']) if indep else '-'}, of the plain {k}-component ensemble "
            f"{fmt(value(plain, 'pd_abs'))}."
        )
        if ad:
            verdicts = {v: holm_verdict(e["vs_plain"]["pd_abs"], alpha) for v, e in ad.items()}
            lower = [v for v, x in verdicts.items() if x == "lower"]
            higher = [v for v, x in verdicts.items() if x == "higher"]
            if lower:
                costs = {v: _costs(ad[v]["vs_plain"], alpha) for v in lower}
                text += " Anti-distillation reduced pd_abs beyond plain ensembling at " + ", ".join(
                    v
                    + (
                        f" (but {' and '.join(costs[v])})"
                        if costs[v]
                        else " (churn and accuracy no worse)"
                    )
                    for v in lower
                )
            else:
                text += (
                    " Anti-distillation did not reduce pd_abs beyond plain ensembling at any lambda"
                )
            if higher:
                text += f" and increased it at {', '.join(higher)}"
            best = min(ad, key=lambda v: ad[v]["vs_plain"]["pd_abs"]["diff"])
            d, rec = ad[best]["vs_plain"], records[ensemble_name(dataset, k, best)]
            text += (
                f". Lowest pd_abs at {best}: {fmt(value(rec, 'pd_abs'))}, minus "
                f"plain {_diff_p(d, 'pd_abs')}, churn {_diff_p(d, 'churn')}, "
                f"accuracy {_diff_p(d, 'acc_mean')}"
            )
            vi = ad[best].get("vs_independent")
            if vi:
                text += (
                    f"; {_phrase(holm_verdict(vi['pd_abs'], alpha))} the independent ensembles "
                    f"of {k} ({_diff_p(vi, 'pd_abs')})"
                )
            strongest = max(
                ad, key=lambda v: records[ensemble_name(dataset, k, v)]["info"]["lambda"]
            )
            comp = [
                (records[ensemble_name(dataset, k, v)].get("components") or {})
                for v in ("plain", strongest)
            ]
            key = f"corr_{config.ad_output}"
            if all(c.get("test") for c in comp):
                text += (
                    f". Component correlation of the {config.ad_output} (test / train): "
                    f"plain {fmt(comp[0]['test'][key])} / {fmt(comp[0]['train'][key])}, "
                    f"{strongest} {fmt(comp[1]['test'][key])} / "
                    f"{fmt(comp[1]['train'][key])} (centred logits, test: "
                    f"{fmt(comp[0]['test']['corr_centred_logits'])}, "
                    f"{fmt(comp[1]['test']['corr_centred_logits'])}); components disagree on "
                    f"{fmt(comp[0]['test']['disagreement'])} and "
                    f"{fmt(comp[1]['test']['disagreement'])} of test examples"
                )
        for (kk, v), e in diffs.items():
            if kk == k and v.startswith("codistill-") and "vs_plain" in e:
                rec = records[ensemble_name(dataset, k, v)]
                text += (
                    f". Codistillation ({v}): pd_abs {fmt(value(rec, 'pd_abs'))}, "
                    f"{_phrase(holm_verdict(e['vs_plain']['pd_abs'], alpha))} plain "
                    f"({_diff_p(e['vs_plain'], 'pd_abs')})"
                )
                if "vs_independent" in e:
                    vi = e["vs_independent"]
                    text += (
                        f" and {_phrase(holm_verdict(vi['pd_abs'], alpha))} the independent "
                        f"ensembles ({_diff_p(vi, 'pd_abs')})"
                    )
                text += f", accuracy {fmt(value(rec, 'acc_mean'))}"
        out.append(text + ".")
    return out


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily, Agg canvas, atomic writes; see jaxrepro.plots).


def _value_err(m: Mapping[str, Any] | None, key: str):
    """(value, yerr) of a metric for errorbar; NaN and None when undefined."""
    v = (m or {}).get(key)
    return (math.nan, None) if v is None else (float(v), plots.error_bar(v, m.get(key + "_ci")))


def _lambda_plot(path: Path, config, records, dataset) -> Path:
    arms = variants(config)
    labels = [
        "0 (plain)"
        if kind == "plain"
        else (num(w) if kind == "anti_distillation" else f"codist {num(w)}")
        for _, kind, w in arms
    ]
    fig, axes = plots.figure(len(REPORT_METRICS), width=3.8, height=3.4)
    single = records[single_name(dataset)]
    for ax, metric in zip(axes, REPORT_METRICS, strict=True):
        for ci_k, k in enumerate(config.ks):
            color = f"C{ci_k}"
            xs, ys = [], []
            for x, (variant, kind, _) in enumerate(arms):
                v, err = _value_err(
                    records[ensemble_name(dataset, k, variant)].get("metrics"), metric
                )
                off = (ci_k - (len(config.ks) - 1) / 2) * 0.08
                ax.errorbar(
                    [x + off],
                    [v],
                    yerr=err,
                    fmt="o" if kind != "codistillation" else "s",
                    color=color,
                    capsize=2,
                    markersize=4,
                )
                if kind != "codistillation":
                    xs.append(x + off)
                    ys.append(v)
            ax.plot(xs, ys, color=color, label=f"K={k}")
            ref = _curve_row(single, k)
            if ref and ref.get(metric) is not None:
                ax.axhline(
                    ref[metric], color=color, linestyle=":", linewidth=1.2, label=f"indep. k={k}"
                )
                ci = ref.get(metric + "_ci")
                if ci and None not in ci:
                    ax.axhspan(ci[0], ci[1], color=color, alpha=0.12, linewidth=0)
        v = value(single, metric)
        if math.isfinite(v):
            ax.axhline(v, color="gray", linestyle="--", linewidth=1, label="single")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel("lambda")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(
        f"{dataset}: anti-distilled ensembles against lambda "
        f"(R={config.replicas}, {config.ad_output}, {config.ad_penalty})"
    )
    return plots.save(fig, path)


def _k_plot(path: Path, config, records, dataset) -> Path:
    arms = variants(config)
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
            ax.errorbar(
                xs,
                ys,
                yerr=[below, above],
                color="black",
                marker="o",
                capsize=2,
                label="indep. ensembles of k",
            )
        for vi, (variant, _, _) in enumerate(arms):
            for k in config.ks:
                off = 1 + (vi - (len(arms) - 1) / 2) * 0.06
                v, err = _value_err(
                    records[ensemble_name(dataset, k, variant)].get("metrics"), metric
                )
                ax.errorbar(
                    [k * off],
                    [v],
                    yerr=err,
                    fmt="o",
                    color=f"C{vi}",
                    capsize=2,
                    markersize=4,
                    label=variant if k == config.ks[0] else None,
                )
        ax.set_xscale("log", base=2)
        ticks = sorted({1, *config.ks})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("ensemble size k / K")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{dataset}: joint K-component ensembles against independent ensembles")
    return plots.save(fig, path)
