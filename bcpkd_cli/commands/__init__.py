"""The commands of `bcpkd`, one module per group; cli.py assembles them into the Typer app.

options.py: the flags and helpers every command shares; training.py: train-teacher, calibrate, distill;
evaluation.py: evaluate, run, plot; deploy.py: export, predict.
"""
