"""The commands that ship a model: export (ONNX, torch.export, safetensors, a Hugging Face folder, a model card) and
predict (new inputs).
Each runs in one process."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from bcpkd_cli import artifacts
from bcpkd_cli.commands.options import TrustOpt, one_process
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models.foreign import trust


def export(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="student.pt or teacher.pt (or its run folder)"),
    out: str = typer.Option("", "--out", "-o", metavar="DIR", help="the export folder (default: <checkpoint "
                                                                    "folder>/export)"),
    formats: Optional[str] = typer.Option(None, "--format", metavar="onnx,pt2,safetensors,hf",
                                          help="the files to write (default: every one that applies; onnx needs the "
                                               "export extra; hf: a Hugging Face folder, for hf: models)"),
    draws: int = typer.Option(0, "--draws", metavar="K", help="vi and mc-dropout teachers: K fixed seeded draws "
                                                              "averaged in the graph instead of the mean network"),
    force: bool = typer.Option(False, "--force", help="replace the export --out holds"),
    trust_code: bool = TrustOpt,
) -> None:
    """Export a student (or a teacher's calibrated predictive) as model.onnx, model.pt2 and model.safetensors (an
    hf: model: hf/, a folder transformers loads, model.onnx and model.pt2 over token ids) with bcpkd-export.json and
    a model card (README.md), each file checked against the checkpoint on the test split. The folder's path goes to
    stdout."""
    from bcpkd_cli.choices import ExportFormat
    from bcpkd_cli.stages import export as stage
    one_process("export")
    trust(everything=trust_code)

    chosen = None
    if formats:
        names = [f.strip() for f in formats.split(",") if f.strip()]
        unknown = [f for f in names if f not in [e.value for e in ExportFormat]]
        if unknown or not names:
            raise BcpkdError(f"--format {formats}: choose from {', '.join(e.value for e in ExportFormat)} "
                             f"(comma-separated)")
        chosen = [ExportFormat(f) for f in names]
    if draws < 0:
        raise BcpkdError(f"--draws {draws}: give K >= 1 draws, or leave it out for the mean network")
    path = artifacts.resolve_checkpoint(checkpoint, (artifacts.STUDENT_FORMAT, artifacts.TEACHER_FORMAT), "export")
    print(stage.run(path, out, chosen, draws, force, shlex.join(["bcpkd", *sys.argv[1:]])))


def predict(
    model: str = typer.Argument(..., metavar="MODEL", help="student.pt, teacher.pt, model.onnx, model.pt2 or an "
                                                           "export folder (or its hf/ folder)"),
    inputs: list[Path] = typer.Argument(..., metavar="INPUT...", help="image files or folders (recursive), "
                                                                      ".csv/.npz files of feature rows, or text: "
                                                                      ".txt (one a line), .csv/.tsv/.jsonl/.parquet"),
    out: str = typer.Option("", "--out", "-o", metavar="FILE.csv|FILE.jsonl",
                            help="write the rows there (default: CSV on stdout)"),
    top_k: int = typer.Option(3, "--top-k", metavar="K", help="classes listed per input, most probable first"),
    batch_size: int = typer.Option(64, "--batch-size", help="inputs per batch"),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="list unreadable inputs on stderr and "
                                                                         "exit 0 (default: exit 2 after the rows)"),
    draws: int = typer.Option(0, "--draws", metavar="K", help="a vi or mc-dropout teacher.pt: K fixed seeded draws "
                                                              "instead of the mean network"),
    force: bool = typer.Option(False, "--force", help="replace the file --out names"),
    text_column: str = typer.Option("", "--text-column", metavar="NAME", help="text models: the tables' column of "
                                                                             "texts (default: the one it was "
                                                                             "trained on)"),
    trust_code: bool = TrustOpt,
) -> None:
    """Classify new inputs: CSV rows of input, class, probability, top-k, entropy and, for Bayesian teachers, the
    epistemic part (mutual information, or the Laplace logit variance)."""
    from bcpkd_cli.stages import predict as stage
    one_process("predict")
    trust(everything=trust_code)
    if top_k < 1 or batch_size < 1:
        raise BcpkdError(f"--top-k {top_k} / --batch-size {batch_size}: give positive numbers")
    stage.run(model, inputs, out, top_k, batch_size, skip_unreadable, draws, force=force, text_column=text_column)
