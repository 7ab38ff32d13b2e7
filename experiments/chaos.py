"""The chaos study: when in training does a tiny perturbation stop changing the model?

Command::

    python experiments/chaos.py --workdir runs/chaos

With no flags: MNIST-1D, an MLP [128, 128] with dropout 0.1 (the main job's model), for relu
and smelu; replicas that share every source of randomness and differ only in a perturbation
w <- w + eps * rms(w) * N(0, 1) applied after global step t, for t on a log-spaced grid from 0
(the initial weights) to the last step and eps in {1e-8, 1e-6, 1e-4, 1e-2}; plus a reference
trial per activation that varies every source. It prints a table of churn with bootstrap
intervals per (t, eps), states from which step (and epoch) a perturbation no longer changes
the predictions measurably, and writes results.json, report.md, churn_vs_step.png and
churn_vs_eps.png. ``--quick`` shrinks it to a smoke run (relu; eps 1e-6 and 1e-2; 3 steps).

Expected runtime on a 2-core CPU: see BUILD_NOTES.md ("Chaos study"); ``--quick`` seconds.
"""

from absl import app

from jaxrepro import study

study.define_flags(study.ChaosConfig)


def main(argv):
    study.main(study.ChaosConfig, argv)


if __name__ == "__main__":
    app.run(main)
