"""The studies the project reproduces, one module each; importing one registers it with
``jaxrepro.study.run``."""

from jaxrepro.studies import irreproducibility, synthetic_data, test_set_variance

__all__ = ["irreproducibility", "synthetic_data", "test_set_variance"]
