"""The studies and the machinery that runs them as resumable batch jobs.

Modules, by concern:

- ``base``: the config base class (the fields every study shares) and its checks, the
  randomness settings, datasets, tasks and fit settings.
- ``flags``: absl flags from a config, and ``main``, the body of an experiment binary.
- ``workdir``: the workdir's config check, progress lines, orbax checkpoints and saved
  predictions.
- ``runner``: ``Trial``, training with resume, and ``run``: trials -> predictions ->
  ``analyse`` -> results.json -> ``render`` -> report.md.
- ``render``: table cells, Markdown tables, intervals and verdicts shared by the reports.
- One module per study (config, trials, a pure ``analyse``) and one ``*_report`` module per
  study (``render``: its report's text and plots): ``irreproducibility`` (the main job),
  ``synthetic``, ``test_set_variance``, ``anti_distillation``, ``regularizers``, ``chaos``.

Nothing here is imported by ``import jaxrepro``; a study module is imported when it is run or
looked up by name (``runner.study_module``, ``config_class``).
"""

from __future__ import annotations

import importlib

NAMES = (
    "irreproducibility",
    "synthetic",
    "test_set_variance",
    "anti_distillation",
    "regularizers",
    "chaos",
)
"""The studies, by ``StudyConfig.STUDY`` (each is the module ``jaxrepro.studies.<name>``)."""

CONFIG_CLASSES = {
    "irreproducibility": "IrreproducibilityConfig",
    "synthetic": "SyntheticConfig",
    "test_set_variance": "TestSetVarianceConfig",
    "anti_distillation": "AntiDistillationConfig",
    "regularizers": "RegularizersConfig",
    "chaos": "ChaosConfig",
}
"""The config class of each study, by name."""


def config_class(name: str):
    """The config class of the study ``name`` (its module imported on first use)."""
    if name not in CONFIG_CLASSES:
        raise ValueError(f"unknown study {name!r}; choose from {', '.join(NAMES)}")
    return getattr(importlib.import_module(f"jaxrepro.studies.{name}"), CONFIG_CLASSES[name])
