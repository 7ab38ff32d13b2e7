"""Do regularisers improve reproducibility? (after apurvakokate/Reproducibility)

Command (installs nothing; see the README for the install line)::

    python experiments/regularizers.py --workdir runs/regularizers

With no flags: MNIST-1D (4000 train / 1000 test), relu MLPs of width 128 and depth 2, 6 and 20
hidden layers, trained with SGD (lr 0.3), SGD with momentum 0.9 (lr 0.03) and Adam (lr 3e-3),
each with no regulariser (the baseline) and with one regulariser at a time: weight decay 5e-4,
dropout 0.1, LayerNorm, BatchNorm, residual connections, label smoothing 0.1; 8 replicas per
trial that differ in init and data order (``--vary``), 15 epochs, batch 128: 63 trials. It
prints, per depth, a table of acc_mean, churn and eta (Effective Test Accuracy = acc_mean -
churn) with 95% bootstrap intervals, pd_abs, and each regulariser's paired difference of
pd_abs and churn against its baseline (paired two-way bootstrap over replicas and test
examples, 1000 samples; significant when the 95% interval excludes 0), and writes
results.json, report.md, churn_eta.png and pd_difference.png to the workdir. Rerun the same
command to resume after an interruption. ``--quick`` shrinks it to a smoke run (depth 2, width
32, Adam, dropout and layernorm, 4 replicas, 2 epochs, 512 training examples).

Expected runtime on a 2-core CPU: about 15 to 20 minutes (15m30s measured with the test suite
running beside it part of the time, 19m40s beside another study; peak RSS 4.6 GB, the compiled
programs of 63 tasks). Compilation dominates: every arm is its own task, and a depth-20 trial
spends 15 to 30 s compiling, 10 to 20 s training. ``--quick``: 20 to 50 s, almost all
compilation. The two runs gave identical results.

Expected result (seed 0, the default run):

- Baselines: churn grows with depth: 0.32 to 0.35 at depth 2 (accuracy 0.59 to 0.63), 0.40
  to 0.47 at depth 6 (0.53 to 0.64), at depth 20 0.50 with Adam (accuracy 0.48), 0.63 with
  momentum (0.41) and 0.87 with SGD, which barely learns (0.14).
- Of the 45 paired comparisons where both arms learned (accuracy above 1.5 times chance),
  pd_abs is significantly lower in 17 and higher in 12; churn lower in 7 and higher in 6
  (chance alone: about 2.3): no consistent effect, the seed repository's conclusion that
  regularisers do not reliably make predictions more reproducible.
- dropout (0.1) lowers pd_abs in 7 of 9 cells (by 0.04 to 0.13) but churn in only 2: less
  confident predictions rather than more agreement; weight decay lowers pd_abs in 5 of 9
  (by 0.01 to 0.03), churn in 1; label smoothing lowers pd_abs in 4, churn in 1 and raises
  it in 2.
- LayerNorm raises pd_abs in 5 of 9 cells and churn in 5, and at depth 20 does not train
  at these learning rates (accuracy 0.10 to 0.14; with Adam 1e-3 instead of 3e-3 it does:
  test accuracy 0.35 to 0.38 after 5 epochs); BatchNorm raises pd_abs in 6 but lowers churn
  in 3 and raises eta the most (mean +0.14), mostly by making depth 20 trainable with SGD
  (accuracy 0.50).
- residual connections at depth 20 diverge (NaN in all 8 replicas) with SGD and momentum:
  reported in the report's "Diverged replicas" section and excluded.
"""

from absl import app

from jaxrepro import study
from jaxrepro.studies.regularizers import RegularizersConfig

study.define_flags(RegularizersConfig)


def main(argv):
    study.main(RegularizersConfig, argv)


if __name__ == "__main__":
    app.run(main)
