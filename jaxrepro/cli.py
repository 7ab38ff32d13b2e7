"""The ``jaxrepro`` command: every study from an installed package.

Usage::

    jaxrepro --help                                   # the studies, one entry each
    jaxrepro <study> --workdir DIR [flags]            # run a study (resumes when rerun)
    jaxrepro <study> --help                           # that study's flags
    python -m jaxrepro <study> ...                    # the same, without the console script

``jaxrepro <study> ...`` is ``python experiments/<study>.py ...`` without the repository: the
same flags (``jaxrepro.study.define_flags``), the same body (``jaxrepro.study.main``) under
``absl.app.run``, the same results. The studies are ``jaxrepro.studies.NAMES``; each one's
description is the first paragraph of its module's docstring, read without importing it (so
``--help`` does not start JAX).

``main`` returns the exit status: 0 on success, 2 for a missing or unknown study, and what
``absl.app.run`` exits with otherwise (1 for a usage error, and for ``<study> --help``, as the
binaries do).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import re
import sys
import textwrap
from collections.abc import Sequence

from jaxrepro import studies

_HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull", "help")

_defined_flags: list[str] = []
"""The absl flags this module defined on ``absl.flags.FLAGS`` (the last study run in this
process), removed before another call defines its study's flags."""


def _module_doc(name: str) -> str:
    """The docstring of ``jaxrepro.studies.<name>``, from its source when there is one."""
    module = f"jaxrepro.studies.{name}"
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        with open(spec.origin, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        if doc:
            return doc
    return importlib.import_module(module).__doc__ or ""


def description(name: str) -> str:
    """The one-paragraph description of study ``name``: the first paragraph of its module's
    docstring, on one line, with reStructuredText's double backquotes removed.

    >>> description("chaos")
    'The chaos study: when in training is irreproducibility born?'
    """
    first = _module_doc(name).strip().split("\n\n")[0]
    return re.sub(r"``(.*?)``", r"\1", " ".join(first.split()))


def usage(prog: str = "jaxrepro") -> str:
    """The text of ``jaxrepro --help``: the usage lines and every study with its description."""
    width = max(len(n) for n in studies.NAMES) + 4
    lines = [
        f"usage: {prog} <study> --workdir DIR [flags]",
        f"       {prog} <study> --help    (the study's flags)",
        "",
        "Runs a study as a resumable batch job in DIR: it trains the study's replica sets, then",
        "writes results.json, report.md and the plots, and prints the report. Rerun the same",
        "command to resume after an interruption. --quick shrinks any study to a smoke run.",
        "",
        "studies:",
    ]
    for name in studies.NAMES:
        lines += textwrap.wrap(
            description(name),
            width=100,
            initial_indent=f"  {name:<{width - 2}}",
            subsequent_indent=" " * width,
        )
    return "\n".join(lines) + "\n"


def _study_doc(name: str, prog: str) -> str:
    """What absl's usage prints above a study's flags (``--help``, usage errors)."""
    text = (
        f"{prog}: {description(name)}\n\n"
        f"The study is jaxrepro.studies.{name} (in a clone, also the binary "
        f"experiments/{name}.py). --quick shrinks it to a smoke run; rerun the same command "
        "to resume after an interruption."
    )
    paragraphs = [textwrap.fill(p, width=80) for p in text.split("\n\n")]
    head = [paragraphs[0], f"usage: {prog} --workdir DIR [flags]", *paragraphs[1:]]
    return "\n\n".join(head) + "\n"


@contextlib.contextmanager
def _as_main_program(prog: str, doc: str):
    """Makes ``prog`` the program absl names (``sys.argv[0]``: the module whose flags --help
    lists) and ``doc`` the text its usage prints (``__main__``'s docstring), restoring both."""
    main_module = sys.modules.get("__main__")
    old_argv, old_doc = sys.argv, getattr(main_module, "__doc__", None)
    sys.argv = [prog, *sys.argv[1:]]
    if main_module is not None:
        main_module.__doc__ = doc.replace("%", "%%")  # absl substitutes %s in it
    try:
        yield
    finally:
        sys.argv = old_argv
        if main_module is not None:
            main_module.__doc__ = old_doc


def _define_study_flags(config_cls, prog: str) -> None:
    """Defines the study's flags on ``absl.flags.FLAGS`` as the flags of ``prog``, removing the
    ones an earlier call in this process defined (so ``main`` can be called again, in tests)."""
    from absl import flags

    from jaxrepro import study

    for name in _defined_flags:
        if name in flags.FLAGS:
            delattr(flags.FLAGS, name)
    _defined_flags.clear()
    before = set(flags.FLAGS)
    study.define_flags(config_cls, module_name=prog)
    _defined_flags.extend(sorted(set(flags.FLAGS) - before))
    flags.FLAGS.unparse_flags()  # a rerun parses from the defaults, not the last call's values


def main(argv: Sequence[str] | None = None, prog: str = "jaxrepro") -> int:
    """Runs ``jaxrepro <study> [flags]``; ``argv`` excludes the program name (default
    ``sys.argv[1:]``). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _HELP:
        sys.stdout.write(usage(prog))
        return 0
    if not argv:
        sys.stderr.write(usage(prog) + f"\n{prog}: error: name a study\n")
        return 2
    name = argv[0].replace("-", "_")
    if name not in studies.NAMES:
        sys.stderr.write(
            f"{prog}: error: unknown study {argv[0]!r}; the studies are: "
            f"{', '.join(studies.NAMES)} (see {prog} --help)\n"
        )
        return 2

    from absl import app

    from jaxrepro import study

    config_cls = studies.config_class(name)
    study_prog = f"{prog} {name}"

    def study_main(rest):
        study.main(config_cls, rest)  # returns the results; the exit status is 0

    with _as_main_program(study_prog, _study_doc(name, study_prog)):
        _define_study_flags(config_cls, study_prog)
        try:
            app.run(study_main, argv=[study_prog, *argv[1:]])
        except SystemExit as e:
            code = e.code
        else:  # app.run always exits; kept for a patched one
            code = 0
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1
