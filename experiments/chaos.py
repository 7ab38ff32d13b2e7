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

Expected runtime on a 2-core CPU: about 8.5 minutes (74 trials of 16 replicas, 20 epochs;
8m32s measured); ``--quick`` about 25 seconds, mostly compilation.

Expected result (seed 0, portable mode: the same bits on any x86-64 CPU; BUILD_NOTES.md "Chaos
and multiplicity"):

- relu: any perturbation from eps 1e-8 up, applied at any step up to 247 (epoch 8 of 20),
  changes the test predictions measurably: churn 0.035 (eps 1e-8) to 0.132 (eps 1e-2) at the
  initial weights, falling to 0.014-0.045 at step 247 (every source varied: 0.292). Only at the
  last step (the final weights, nothing trained after) does eps <= 1e-4 change nothing.
- smelu: eps 1e-8 and 1e-6 change no prediction at any step (churn exactly 0); eps 1e-4 changes
  about 1 test example in 2,000 (churn 2e-4 to 6e-4), eps 1e-2 0.004 to 0.027.
"""

from absl import app

from jaxrepro import study

study.define_flags(study.ChaosConfig)


def main(argv):
    study.main(study.ChaosConfig, argv)


if __name__ == "__main__":
    app.run(main)
