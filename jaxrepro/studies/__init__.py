"""The studies the project reproduces, one module each; importing one registers it with
``jaxrepro.study.run``."""

from jaxrepro.studies import (
    anti_distillation,
    irreproducibility,
    regularizers,
    synthetic_data,
    test_set_variance,
)

__all__ = ["anti_distillation", "irreproducibility", "regularizers", "synthetic_data",
           "test_set_variance"]
