"""l2cluster: regularization studies on MNIST — job specs, regularizer plugins, a stacked trainer, a Ray daemon."""

__version__ = "0.2.0"
