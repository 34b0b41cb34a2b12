"""bcpkd: knowledge distillation from Bayesian teachers through cached Bayes class probabilities."""

__version__ = "0.1.0"


def load(path, draws: int = 0, device="cpu"):
    """A student.pt or teacher.pt (or its run folder) as an eval-mode torch module: inputs [B, ...] -> probabilities
    [B, C] (a teacher: its calibrated predictive), with `.classes` and `.preprocess` (bcpkd_cli.deployable)."""
    from bcpkd_cli.deployable import load as load_classifier

    return load_classifier(path, draws, device)
