"""Anti-distillation (Shamir & Coviello): do decorrelated ensembles reduce PD beyond ensembling?

Command::

    python experiments/anti_distillation.py --workdir runs/anti_distillation

TODO: fill in after measuring.
"""

from absl import app

import jaxrepro
from jaxrepro import study
from jaxrepro.studies.anti_distillation import AntiDistillationConfig

study.define_flags(AntiDistillationConfig)


def main(argv):
    jaxrepro.use_cpu_devices()
    study.main(AntiDistillationConfig, argv)


if __name__ == "__main__":
    app.run(main)
