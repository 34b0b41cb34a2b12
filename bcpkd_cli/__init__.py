"""bcpkd: knowledge distillation from Bayesian teachers through cached Bayes class probabilities."""

__version__ = "0.1.0"
