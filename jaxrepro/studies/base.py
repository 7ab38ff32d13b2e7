"""What every study shares: the config base class and its checks, the randomness settings, and
the datasets, models and fit settings the studies build their trials from.

A study config is a frozen dataclass deriving from ``StudyConfig``; its fields are the flags of
the study's binary. ``StudyConfig`` declares the six fields every study has (``replicas``,
``epochs``, ``batch_size``, ``num_train``, ``num_test``, ``seed``); a study changes a default
by redeclaring the field with its own default (and help text, where the study's meaning
differs). ``__post_init__`` checks the shared fields, then calls the study's ``check``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from jaxrepro import activations, augment, checks, data, engine, models, randomness, synthetic

# ---------------------------------------------------------------------------------------------
# Errors and config fields.


class ConfigError(ValueError):
    """A bad study config: ``fields`` names the offending config fields (which are the flags)."""

    def __init__(self, fields: str | Sequence[str], message: str):
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.problem = message
        super().__init__(f"{', '.join(self.fields)}: {message}")

    def as_flags(self) -> str:
        """The message with each field written as its command-line flag."""
        return f"{', '.join('--' + f for f in self.fields)}: {self.problem}"


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(field, message)


def flag_field(default, help_text: str):
    """A config field: its default and the help text of its flag."""
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"help": help_text})


def field_help(config_cls: type, name: str) -> str:
    """The help text of a field: its own, else that of the nearest base class declaring it."""
    for cls in config_cls.__mro__:
        f = getattr(cls, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f.metadata["help"]
    return name


is_int = checks.is_integer


def is_number(v) -> bool:
    """A finite real number (not a bool)."""
    return checks.is_number(v) and math.isfinite(v)


def check_activation(field: str, spec: str) -> None:
    try:
        activations.get(spec)
    except ValueError as e:
        raise ConfigError(field, str(e)) from None


def check_widths(field: str, widths) -> None:
    require(
        len(widths) > 0 and all(is_int(w) and w >= 1 for w in widths),
        field,
        f"must be a non-empty list of positive ints, got {list(widths)!r}",
    )


def check_unique(field: str, values) -> None:
    require(len(values) > 0, field, "must not be empty")
    require(len(set(values)) == len(values), field, f"has duplicates: {list(values)!r}")


def check_sources(field: str, names) -> tuple[str, ...]:
    """``randomness.check_sources`` with its error as a ``ConfigError`` naming ``field``."""
    try:
        return randomness.check_sources(names, what=field)
    except ValueError as e:
        raise ConfigError(field, str(e)) from None


def check_level(field: str, level) -> None:
    require(is_number(level) and 0.0 < level < 1.0, field, f"must be in (0, 1), got {level!r}")


def check_bootstrap(config) -> None:
    """The interval fields of a study that reports bootstrap intervals over one axis:
    ``num_samples`` (an int >= 1), ``bootstrap_over`` (replicas or examples) and ``level``."""
    check_int("num_samples", config.num_samples)
    check_choice("bootstrap_over", config.bootstrap_over, ("replicas", "examples"))
    check_level("level", config.level)


def check_int(field: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    """An int in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None)."""
    ok = is_int(value) and value >= minimum and (maximum is None or value <= maximum)
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    require(ok, field, f"must be an int {bound}, got {value!r}")


def check_number(
    field: str, value, minimum: float = 0.0, *, below: float | None = None, strict: bool = False
) -> None:
    """A finite number ``>= minimum`` (``> minimum`` when ``strict``) and ``< below``."""
    ok = is_number(value) and (value > minimum if strict else value >= minimum)
    ok = ok and (below is None or value < below)
    bound = f"{'>' if strict else '>='} {minimum}" if below is None else f"in [{minimum}, {below})"
    require(ok, field, f"must be a finite number {bound}, got {value!r}")


def check_choice(field: str, value, choices) -> None:
    require(
        value in choices, field, f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    )


def check_choices(field: str, values, choices, what: str = "value") -> None:
    """A non-empty list without duplicates, each of ``choices``."""
    check_unique(field, values)
    for v in values:
        require(
            v in choices, field, f"unknown {what} {v!r}; choose from {', '.join(map(str, choices))}"
        )


def check_synthetic(make_spec, fields: Mapping[str, str]) -> None:
    """Builds a ``synthetic.Synthetic`` spec; its error ("synthetic <knob>: ...") becomes a
    ``ConfigError`` naming the config field of that knob (``fields``: knob -> field)."""
    try:
        make_spec()
    except ValueError as e:
        knob = str(e).split(":")[0].replace("synthetic ", "")
        raise ConfigError(fields.get(knob, knob), str(e)) from None


FILE_DATASETS = ("cifar10",)
"""Datasets read from the user's own files (``data_dir``), never downloaded or generated."""


def check_data_dir(config, datasets) -> None:
    """``data_dir`` is given (a non-empty string) exactly when one of ``datasets`` is read from
    files (`FILE_DATASETS`): a dataset without its files, or files no dataset reads, is a
    ``ConfigError`` naming ``data_dir``. Whether the directory holds the files is checked where
    the dataset is loaded (``load_dataset``)."""
    value = config.data_dir
    require(isinstance(value, str), "data_dir", f"must be a path (a string), got {value!r}")
    wanted = [d for d in datasets if d in FILE_DATASETS]
    if wanted:
        require(
            bool(value),
            "data_dir",
            f"the {wanted[0]} dataset is read from your own copy, never downloaded: give its "
            "directory (for cifar10 the cifar-10-batches-py directory extracted from the "
            "official cifar-10-python.tar.gz)",
        )
    else:
        require(
            not value,
            "data_dir",
            f"only {', '.join(FILE_DATASETS)} read files, and the dataset(s) asked for "
            f"({', '.join(datasets)}) do not; drop --data_dir or choose {FILE_DATASETS[0]}",
        )


# The randomness settings of the studies: name -> the sources varied per replica.
SETTINGS: dict[str, tuple[str, ...]] = {
    "nothing": (),
    "init": ("init",),
    "order": ("order",),
    "dropout": ("dropout",),
    "augment": ("augment",),
    "perturb": ("perturb",),
    "both": ("init", "order"),
    "all": randomness.SOURCES,
}
"""Setting names accepted by the studies: ``nothing`` is the control (all replicas identical),
``both`` is init and order, ``all`` every source."""


def check_settings(field: str, names) -> None:
    check_unique(field, names)
    for name in names:
        require(
            name in SETTINGS,
            field,
            f"unknown randomness setting {name!r}; choose from {', '.join(SETTINGS)}",
        )


# ---------------------------------------------------------------------------------------------
# The config base class.


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The fields and behaviour every study config shares (frozen dataclasses whose fields are
    the flags). ``STUDY`` names the study (its module in ``jaxrepro.studies``); ``QUICK`` holds
    the field values of the smoke run (``quick()``, ``--quick``)."""

    STUDY: ClassVar[str] = ""
    QUICK: ClassVar[Mapping[str, Any]] = {}

    replicas: int = flag_field(16, "replicas per trial (>= 2)")
    epochs: int = flag_field(20, "training epochs")
    batch_size: int = flag_field(128, "batch size")
    num_train: int = flag_field(0, "training examples to use (0: all)")
    num_test: int = flag_field(0, "test examples to use (0: all)")
    seed: int = flag_field(0, "root seed of the replicas (and of the bootstrap)")

    def __post_init__(self):
        for name in ("replicas", "epochs", "batch_size"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, name, f"must be an int >= 1, got {value!r}")
        require(
            self.replicas >= 2,
            "replicas",
            f"must be >= 2 (the metrics compare pairs of replicas), got {self.replicas}",
        )
        if hasattr(self, "learning_rate"):  # studies with one rate per optimizer check their own
            require(
                is_number(self.learning_rate) and self.learning_rate > 0,
                "learning_rate",
                f"must be a positive number, got {self.learning_rate!r}",
            )
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            require(
                is_int(value) and value >= 0,
                name,
                f"must be an int >= 0 (0: the whole split), got {value!r}",
            )
        require(
            is_int(self.seed) and 0 <= self.seed < randomness.SEED_LIMIT,
            "seed",
            f"must be an int in [0, 2**32), got {self.seed!r}",
        )
        self.check()

    def check(self) -> None:
        """The study's own checks (raise ``ConfigError`` naming the field)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """The config from ``to_dict`` output (lists become tuples); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(unknown, f"unknown field(s) of {cls.__name__}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def quick(cls, **overrides):
        """The config shrunk to a run of seconds (tests, smoke runs), with ``overrides``."""
        return cls(**{**cls.QUICK, **overrides})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Datasets, tasks and fit settings.


def subset(ds: data.Dataset, num_train: int, num_test: int) -> data.Dataset:
    """The first ``num_train`` / ``num_test`` examples of each split (0: all of it).

    Raises:
      ConfigError: asking for more examples than the split has (never silently fewer).
    """
    for field, wanted, have in (
        ("num_train", num_train, ds.num_train),
        ("num_test", num_test, ds.num_test),
    ):
        if wanted > have:
            raise ConfigError(
                field,
                f"asks for {wanted} examples but the {ds.name} dataset has {have}; use at "
                f"most {have} (0: all of them)",
            )
    if not num_train and not num_test:
        return ds
    n_tr, n_te = num_train or ds.num_train, num_test or ds.num_test
    return data.Dataset(
        ds.x_train[:n_tr],
        ds.y_train[:n_tr],
        ds.x_test[:n_te],
        ds.y_test[:n_te],
        num_classes=ds.num_classes,
        name=ds.name,
    )


def binary_subset(ds: data.Dataset, classes: Sequence[int]) -> data.Dataset:
    """The examples of two classes, relabelled 0 (``classes[0]``) and 1 (``classes[1]``)."""
    a, b = (int(c) for c in classes)

    def pick(x, y):
        keep = (y == a) | (y == b)
        return x[keep], (y[keep] == b).astype(np.int32)

    x_tr, y_tr = pick(ds.x_train, ds.y_train)
    x_te, y_te = pick(ds.x_test, ds.y_test)
    return data.Dataset(x_tr, y_tr, x_te, y_te, num_classes=2, name=f"{ds.name}_{a}v{b}")


def load_dataset(
    name: str,
    num_train: int = 0,
    num_test: int = 0,
    *,
    binary_classes: Sequence[int] = (2, 7),
    synthetic_spec: synthetic.Synthetic | None = None,
    data_dir: str = "",
) -> data.Dataset:
    """A study's dataset by name, cut to ``num_train`` / ``num_test`` examples (0: all).

    ``mnist1d`` and ``digits`` (``data.load``); ``mnist1d_binary``: the two MNIST-1D classes
    ``binary_classes``; ``synthetic``: ``synthetic_spec.dataset()`` (its own sizes);
    ``cifar10``: ``data.cifar10(data_dir)``, normalised, the first examples of each split.

    Raises:
      ConfigError: asking for more examples than the split has (naming ``num_train`` or
        ``num_test``); for ``cifar10``, a missing ``data_dir`` or one whose files are missing
        or unreadable (naming ``data_dir``, with the loader's message naming the file).
    """
    if name == "cifar10":
        require(bool(data_dir), "data_dir", "cifar10 needs the cifar-10-batches-py directory")
        try:
            return data.cifar10(data_dir, num_train=num_train, num_test=num_test)
        except (FileNotFoundError, ValueError) as e:
            # The loader's size check names its argument first ("num_train=...").
            field = next((f for f in ("num_train", "num_test") if str(e).startswith(f)), None)
            raise ConfigError(field or "data_dir", str(e)) from None
    if name == "synthetic":
        if synthetic_spec is None:
            raise ValueError("the synthetic dataset needs its synthetic_spec")
        return synthetic_spec.dataset()
    if name == "mnist1d_binary":
        return subset(binary_subset(data.mnist1d(), binary_classes), num_train, num_test)
    return subset(data.load(name), num_train, num_test)


@functools.cache
def adam(learning_rate: float):
    """One optax object per learning rate for the whole process: compiled functions are cached
    by the optimizer's identity, so every trial (and study) with this rate shares them."""
    import optax

    return optax.adam(learning_rate)


@functools.cache
def mlp_task(
    widths: tuple[int, ...],
    num_classes: int,
    activation: str,
    dropout_rate: float,
    learning_rate: float,
) -> engine.Task:
    """An MLP trained with Adam and the default loss (cached: equal arguments, one task)."""
    model = models.MLP(
        widths=tuple(widths),
        num_classes=num_classes,
        activation=activation,
        dropout_rate=dropout_rate,
    )
    return engine.Task(model=model, tx=adam(learning_rate))


@functools.cache
def airbench_task(
    widths: tuple[int, ...],
    num_classes: int,
    activation: str,
    dropout_rate: float,
    learning_rate: float,
) -> engine.Task:
    """``models.AirbenchNet`` with blocks of ``widths``, trained with Adam, the default loss
    and the standard CIFAR-10 augmentation ``augment.RandomCropFlip(pad=4)`` (reflect
    padding), which draws from the ``augment`` source (cached: equal arguments, one task)."""
    model = models.AirbenchNet(
        widths=tuple(widths),
        num_classes=num_classes,
        activation=activation,
        dropout_rate=dropout_rate,
    )
    return engine.Task(model=model, tx=adam(learning_rate), augment=augment.RandomCropFlip(pad=4))


def model_task(
    dataset: str,
    widths: tuple[int, ...],
    num_classes: int,
    activation: str,
    dropout_rate: float,
    learning_rate: float,
) -> engine.Task:
    """The task a study trains on ``dataset``: ``airbench_task`` (``widths`` the blocks'
    widths) for the images of ``cifar10``, ``mlp_task`` (``widths`` the hidden widths) for the
    others. Choosing the network by dataset, with the augmentation it is trained with, is the
    project's choice: an MLP on CIFAR-10 is far from the networks whose irreproducibility
    matters there."""
    make = airbench_task if dataset == "cifar10" else mlp_task
    return make(tuple(widths), num_classes, activation, dropout_rate, learning_rate)


def bootstrap_kwargs(config: StudyConfig, **extra) -> dict[str, Any]:
    """``metrics.compare`` / ``metrics.difference`` arguments of a config's intervals: the
    study's bootstrap key (``randomness.bootstrap_key(seed)``), ``num_samples`` and ``level``."""
    return dict(
        key=randomness.bootstrap_key(config.seed),
        num_samples=config.num_samples,
        level=config.level,
        **extra,
    )


def fit_config(config: StudyConfig, vary, **kwargs) -> engine.FitConfig:
    """The ``FitConfig`` of a trial: the config's replicas, seed, batch size and epochs, varying
    ``vary`` (``perturb_scale`` applies only when ``perturb`` is varied)."""
    vary = tuple(vary)
    perturb = kwargs.pop("perturb_scale", None)
    return engine.FitConfig(
        replicas=config.replicas,
        seed=config.seed,
        vary=vary,
        batch_size=config.batch_size,
        epochs=config.epochs,
        perturb_scale=perturb if "perturb" in vary else None,
        **kwargs,
    )
