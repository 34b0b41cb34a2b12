"""bcpkd: knowledge distillation from Bayesian teachers through cached Bayes class probabilities."""

__version__ = "0.1.0"


def load(path, draws: int = 0, device="cpu"):
    """A student.pt or teacher.pt (or its run folder) as an eval-mode torch module: inputs [B, ...], or a list of
    image files, feature rows or texts, -> probabilities [B, C] (a teacher: its calibrated predictive), with
    `.classes` and `.preprocess` (bcpkd_cli.deployable)."""
    from bcpkd_cli.deployable import load as load_classifier

    return load_classifier(path, draws, device)


def export(checkpoint, out: str = "", formats=None, draws: int = 0, force: bool = False):
    """`bcpkd export` from Python: the export folder (a pathlib.Path) of a student.pt or teacher.pt; `formats` a
    list of "onnx", "pt2", "safetensors", "hf" (default: every one that applies)."""
    import shlex
    from pathlib import Path

    from bcpkd_cli import artifacts
    from bcpkd_cli.choices import ExportFormat
    from bcpkd_cli.stages import export as stage

    path = artifacts.resolve_checkpoint(Path(checkpoint), (artifacts.STUDENT_FORMAT, artifacts.TEACHER_FORMAT), "export")
    chosen = [ExportFormat(f) for f in formats] if formats else None
    command = shlex.join(["bcpkd_cli.export", str(checkpoint), f"out={out}", f"formats={formats}"])
    return stage.run(path, out, chosen, draws, force, command)
