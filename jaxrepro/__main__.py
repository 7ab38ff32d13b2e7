"""``python -m jaxrepro <study> --workdir DIR [flags]``: the ``jaxrepro`` command (``cli``)."""

import sys

from jaxrepro.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m jaxrepro"))
