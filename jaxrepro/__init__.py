"""jaxrepro: train many replicas of a model at once and measure their irreproducibility."""
