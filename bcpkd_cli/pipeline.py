"""`bcpkd run`: every stage of one recipe, chained through files, ending in one comparison table.

The recipe's `experiment` section names teachers (overrides of `teacher`, optionally `base: NAME`
to fit a posterior around another teacher of the recipe) and students (overrides of `distill`, plus
`teacher: NAME`, `calibrate:` and `evaluate:` overrides), each trained once per seed. All sub-recipes
are validated before any training starts. With `resume`, the teachers and students an earlier run of
the recipe finished in `out` are reused and interrupted ones continue from their last epoch.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.table import Table

from bcpkd_cli import artifacts
from bcpkd_cli.calibration import PREDICTIVE_VERSION, ensure_cache
from bcpkd_cli.config import Recipe, Targets, build_recipe, merge, plain_data, to_plain
from bcpkd_cli.data import check_sizes, decoding_workers, load_dataset
from bcpkd_cli.console import console, duration, show_table, stamp
from bcpkd_cli.engine import resolve_device
from bcpkd_cli.errors import BcpkdError, BcpkdFailure
from bcpkd_cli.resumption import STUDENT_SECTIONS, TEACHER_SECTIONS, finished_artifact, has_saved_state, track
from bcpkd_cli.stages import distill, evaluate, plot, train_teacher
from bcpkd_cli.models.foreign import trust, trusted
from bcpkd_cli.teachers import recipe_problems
from bcpkd_cli.threads import apply_threads, share_with_run_workers

STUDENT_COLUMNS = ["accuracy", "nll", "ece", "kl_to_bcp", "convergence_noise_nll", "convergence_noise_accuracy",
                   "grad_noise"]
TEACHER_COLUMNS = ["accuracy", "nll", "ece", "brier", "kl_to_bcp", "tv_to_bcp"]


def run_config(recipe: Recipe) -> dict:
    """The recipe as plain values, its data section without the keys its dataset does not read."""
    return {**to_plain(recipe), "data": plain_data(recipe.data)}


def teacher_key(name: str, tseed: int, tseeds: tuple[int, ...]) -> str:
    """A teacher's name in the run (and its folder): NAME, or NAME@tSEED when it is trained with several seeds."""
    return f"{name}@t{tseed}" if len(tseeds) > 1 else name


def teacher_of(key: str) -> str:
    """The recipe's name of a teacher key (without its seed)."""
    return key.rsplit("@t", 1)[0]


def _plan(tree: dict, source: str, out: Path) -> tuple[dict[str, dict], list[tuple[str, int, str | None, dict]]]:
    """Validate every sub-recipe up front; return teacher trees and (student, seed, teacher, tree) jobs."""
    recipe = build_recipe(tree, source)
    base_tree = {k: v for k, v in tree.items() if k not in ("out", "experiment")}
    errors: list[str] = []
    teacher_trees: dict[str, dict] = {}
    tseeds = recipe.experiment.teacher_seeds
    for name, overrides in recipe.experiment.teachers.items():
        overrides = dict(overrides or {})
        base = overrides.get("base")
        if base and base not in {teacher_of(k) for k in teacher_trees}:
            errors.append(f"experiment.teachers.{name}.base: {base!r} is not a teacher listed above it")
        for tseed in tseeds:  # one teacher per teacher seed (around the base of the same seed)
            seeded = {"seed": tseed, **({"base": teacher_key(base, tseed, tseeds)} if base else {})} \
                if len(tseeds) > 1 else {}
            key = teacher_key(name, tseed, tseeds)
            teacher_trees[key] = merge(base_tree, {"teacher": {**overrides, **seeded}, "out": str(out / "teachers" / key)})
    jobs = []
    for name, overrides in recipe.experiment.students.items():
        overrides = dict(overrides or {})
        teacher_name = overrides.pop("teacher", None)
        extra = {k: overrides.pop(k) for k in ("calibrate", "evaluate") if k in overrides}
        targets = overrides.get("targets", (tree.get("distill") or {}).get("targets", "teacher"))
        if teacher_name is None and targets in ("teacher", "online"):
            errors.append(f"experiment.students.{name}: targets {targets} needs `teacher: NAME`")
        if teacher_name is not None and teacher_name not in recipe.experiment.teachers:
            errors.append(f"experiment.students.{name}.teacher: {teacher_name!r} is not one of: "
                          f"{', '.join(recipe.experiment.teachers) or 'no teachers defined'}")
        for tseed in tseeds if teacher_name is not None else [None]:
            key = teacher_key(teacher_name, tseed, tseeds) if teacher_name is not None else None
            for seed in recipe.experiment.seeds:
                folder = f"{name}-t{tseed}-seed{seed}" if key is not None and len(tseeds) > 1 else f"{name}-seed{seed}"
                jobs.append((name, seed, key, merge(base_tree, {
                    "distill": {**overrides, "seed": seed}, **extra, "out": str(out / "students" / folder)})))
    for label, sub_tree in [(f"experiment.teachers.{n}", t) for n, t in teacher_trees.items()] + \
                           [(f"experiment.students.{n}", t) for n, s, _, t in jobs if s == recipe.experiment.seeds[0]]:
        try:
            sub_recipe = build_recipe(sub_tree, label, checks=(recipe_problems,))
            trust([sub_recipe.teacher.arch, sub_recipe.distill.arch])  # the recipe names them
        except BcpkdError as err:
            errors.append(str(err))
    if errors:
        raise BcpkdError(f"{source}: " + "; ".join(errors))
    return teacher_trees, jobs


def _build_caches(jobs: list, teacher_paths: dict[str, Path]) -> None:
    """Calibrate and cache each (teacher, settings) pair once, before students run in parallel."""
    for name, _, teacher_name, s_tree in jobs:
        recipe = build_recipe(s_tree, f"experiment.students.{name}")
        if recipe.distill.targets not in (Targets.teacher, Targets.online):
            continue
        path = teacher_paths[teacher_name]
        payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
        device = resolve_device(recipe.device)
        apply_threads(recipe.threads, decoding_workers(recipe.data))
        ensure_cache(path, payload, load_dataset(recipe.data).to(device), recipe.calibrate, recipe.distill.t_teacher,
                     device, n_bins=recipe.evaluate.ece_bins)


def _student_job(name: str, seed: int, s_tree: dict, teacher_path: Path | None, resume: bool,
                 force: bool) -> tuple[Path, dict]:
    """Distill and evaluate one student (in a worker process when experiment.workers > 1)."""
    console.rule(f"student {name}, seed {seed}")
    recipe, folder = build_recipe(s_tree, f"experiment.students.{name}"), Path(s_tree["out"])
    done = finished_artifact(folder / "student.pt", artifacts.STUDENT_FORMAT, recipe, STUDENT_SECTIONS) \
        if resume else None
    if done is not None and teacher_path is not None and not _targets_current(done["targets"], teacher_path):
        done = None  # its teacher (or the teacher's predictive) changed: the student is trained again
    if done is not None:
        console.print(f"reusing {folder / 'student.pt'}")
        path = folder / "student.pt"
    else:
        again = resume and (folder / "student.pt").is_file()  # made from an older teacher: replaced
        path = distill.run(recipe, teacher_path, resume=resume and has_saved_state(folder), force=force or again,
                           label=f"{name} seed={seed}")
    eval_tree = {k: v for k, v in s_tree.items() if k in ("device", "threads", "evaluate")}
    return path, evaluate.evaluate_one(path, eval_tree)


def _worker_start(workers: int, trusted_arches: list[str], trust_all: bool) -> None:
    """A student worker: its share of the CPUs (the automatic threads and loader workers of its stages), and the
    user code this run may import."""
    share_with_run_workers(workers)
    trust(trusted_arches, trust_all)


class _InlineExecutor:
    """workers=1: run each job at submit time, in this process."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


@contextmanager
def _executor(workers: int):
    """A pool of `workers` spawned processes sharing the CPUs (this process, meanwhile, one thread)."""
    if workers == 1:
        yield _InlineExecutor()
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_start, initargs=(workers, *trusted())) as pool:
            try:
                yield pool
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the students in training stop (each keeps the state of
                for worker in list((pool._processes or {}).values()):  # its last epoch end), no other one starts
                    worker.terminate()  # (ProcessPoolExecutor.terminate_workers from Python 3.14)
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        torch.set_num_threads(threads)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


BASELINE = "onehot"  # the student that paired comparisons are made against, when a recipe has one
PAIRED = {"accuracy": "difference", "nll": "difference", "convergence_noise_nll": "ratio",
          "convergence_noise_accuracy": "ratio", "grad_noise": "ratio"}


def _paired_rows(student_reports: dict[str, list[dict]]) -> list[dict]:
    """Each student against the one-hot student of the same seed (same data order): per-seed differences (or
    ratios, for noise) and their mean ± standard error over seeds."""
    base = student_reports.get(BASELINE)
    if base is None:
        return []
    rows = []
    for name, reports in student_reports.items():
        if name == BASELINE:
            continue
        row: dict = {"name": f"{name} vs {BASELINE}", "seeds": len(reports)}
        for key, how in PAIRED.items():
            base_of_seed = {b["seed"]: b for b in base}
            pairs = [(r["metrics"].get(key), base_of_seed[r["seed"]]["metrics"].get(key)) for r in reports
                     if r["seed"] in base_of_seed]
            if not pairs or any(not isinstance(v, float) or not isinstance(w, float) or (how == "ratio" and not w)
                                for v, w in pairs):
                continue
            values = [v - w if how == "difference" else v / w for v, w in pairs]
            mean, std = _mean_std(values)
            row[f"{key} {how}"] = (mean, std / len(values) ** 0.5)
        rows.append(row)
    return rows


def _table(title: str, rows: list[dict], columns: list[str]) -> tuple[Table, str]:
    """A rich table and the same as Markdown; cells are mean ± std over seeds (the value alone for one seed, or
    for a value without a spread, like the paper's number); columns without a value in any row are left out."""
    columns = [c for c in columns if any(c in row for row in rows)]
    table = Table(title=title)
    table.add_column("name")
    for c in columns:
        table.add_column(c, justify="right")
    md = ["| name | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [("-" if c not in row else f"{row[c][0]:.4g}" if row.get("seeds", 1) == 1 or row[c][1] is None else
                  f"{row[c][0]:.4g} ± {row[c][1]:.2g}") for c in columns]
        table.add_row(row["name"], *cells)
        md.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return table, "\n".join(md)


def _targets_current(provenance: dict, teacher_path: Path) -> bool:
    """A finished student's targets came from this teacher file, through a cache of the current predictive."""
    cache = Path(provenance.get("cache", ""))
    return provenance.get("teacher_sha256") == artifacts.sha256_file(teacher_path) and cache.is_file() and \
        artifacts.read_cache_metadata(cache).get("predictive_version") == PREDICTIVE_VERSION


def _teacher(name: str, t_tree: dict, resume: bool, force: bool) -> Path:
    """Train one teacher of the recipe, or reuse / continue the one an earlier run left (resume)."""
    recipe, folder = build_recipe(t_tree, f"experiment.teachers.{name}"), Path(t_tree["out"])
    cfg = recipe.teacher
    by_file = ("teacher.base", "teacher.ensemble.checkpoints")  # compared by the files' hashes below
    adopted = ("teacher.arch", "teacher.hidden") if cfg.base or cfg.ensemble.checkpoints else ()  # from those
    done = finished_artifact(folder / "teacher.pt", artifacts.TEACHER_FORMAT, recipe, TEACHER_SECTIONS,
                             by_file + adopted) if resume else None
    if done is not None and cfg.base and done["parent_sha256"] != artifacts.sha256_file(Path(cfg.base)):
        done = None  # its base teacher was trained again: so is this one
    if done is not None and cfg.ensemble.checkpoints and done["history"].get("members_sha256") != \
            [artifacts.sha256_file(Path(p)) for p in cfg.ensemble.checkpoints]:
        done = None  # other member files
    if done is not None:
        console.print(f"reusing {folder / 'teacher.pt'}")
        return folder / "teacher.pt"
    again = resume and (folder / "teacher.pt").is_file()  # around an older base, or of other members: replaced
    return train_teacher.run(recipe, resume=resume and has_saved_state(folder), force=force or again)


def _claim(out: Path, resume: bool, force: bool) -> None:
    """Refuse to replace a finished run, or to train over an interrupted one, unless told which."""
    if resume and not out.is_dir():
        raise BcpkdError(f"--resume: {out} is not the folder of an earlier run; give its --out, or run without "
                         f"--resume")
    if resume or force:
        return
    if (out / "summary.json").is_file():
        raise BcpkdError(f"{out / 'summary.json'}: a finished run is there already; give another --out, add "
                         f"--resume to reuse its teachers and students, or --force to train them again")
    if any((out / part).exists() for part in ("teachers", "students")):
        raise BcpkdError(f"--out {out}: holds an interrupted run; add --resume to continue it, or --force to "
                         f"start afresh")


def run(tree: dict, source: str, resume: bool = False, force: bool = False, plot_figures: bool = False) -> Path:
    """Every teacher and student of a recipe into its out folder; `resume` reuses and continues what an
    earlier run left there, `force` trains everything again over it; `plot_figures` draws the run's figures
    into out/figures (matplotlib)."""
    started = time.monotonic()
    recipe: Recipe = build_recipe(tree, source, checks=(recipe_problems,))
    out = artifacts.new_run_dir(recipe.out, "run")
    _claim(out, resume, force)
    track(out, whole_run=True)  # a Ctrl-C names this folder, and --resume continues it
    teacher_trees, jobs = _plan(tree, source, out)
    check_sizes(recipe.data)  # images that cannot fill the splits: said now, not after the first teacher

    with _executor(recipe.experiment.workers) as pool:
        # Students without a teacher start at once; the others wait for their teacher and its cache.
        futures = {i: pool.submit(_student_job, name, seed, s_tree, None, resume, force)
                   for i, (name, seed, teacher_name, s_tree) in enumerate(jobs) if teacher_name is None}
        teacher_paths: dict[str, Path] = {}
        for name, t_tree in teacher_trees.items():
            base = t_tree["teacher"].get("base")
            if base in teacher_paths:
                t_tree = merge(t_tree, {"teacher": {"base": str(teacher_paths[base])}})
            console.rule(f"teacher {name}")
            teacher_paths[name] = _teacher(name, t_tree, resume, force)
        _build_caches(jobs, teacher_paths)
        for i, (name, seed, teacher_name, s_tree) in enumerate(jobs):
            if teacher_name is not None:
                futures[i] = pool.submit(_student_job, name, seed, s_tree, teacher_paths[teacher_name], resume, force)
        try:
            results = [futures[i].result() for i in range(len(jobs))]
        except BrokenProcessPool:
            raise BcpkdFailure("a student worker process died (out of memory?); rerun with "
                               "--set experiment.workers=1 or a smaller evaluate/calibrate batch_size") from None

    student_reports: dict[str, list[dict]] = {}
    calibrated: dict[str, Path] = {}
    for (name, seed, teacher_name, _), (path, report) in zip(jobs, results):
        payload = artifacts.load_checkpoint(path, artifacts.STUDENT_FORMAT)
        cache_folder = Path(payload["targets"].get("cache", ".")).parent
        tuned = (cache_folder / "report.json").is_file() and \
            {"prior_precision", "temperature"} & set(json.loads((cache_folder / "report.json").read_text()))
        if "cache" in payload["targets"] and tuned:  # a row for a teacher its calibration changed
            calibrated[f"{teacher_name} -> {name}"] = cache_folder / "teacher.pt"
        student_reports.setdefault(name, []).append(report | {"seed": seed})

    console.rule("evaluation")
    teacher_reports, by_teacher = [], {}
    for label, path in [(n, p) for n, p in teacher_paths.items()] + \
                       [(f"{n} (as calibrated)", p) for n, p in calibrated.items()]:
        report = evaluate.evaluate_one(path, {"device": recipe.device, "evaluate": tree.get("evaluate", {})})
        teacher_reports.append({"name": f"teacher {label}", "report": report})
        name = " -> ".join(teacher_of(part) for part in label.split(" -> "))  # the same over teacher seeds
        by_teacher.setdefault(name, []).append(report["metrics"])
    teacher_rows = [{"name": name, "seeds": len(group),
                     **{k: _mean_std([m[k] for m in group]) for k, v in group[0].items() if isinstance(v, float)}}
                    for name, group in by_teacher.items()]
    student_rows = []
    reported = recipe.experiment.reported
    for name, reports in student_reports.items():
        keys = [k for k in reports[0]["metrics"] if all(isinstance(r["metrics"].get(k), float) for r in reports)]
        student_rows.append({"name": name, "seeds": len(reports),
                             **{k: _mean_std([r["metrics"][k] for r in reports]) for k in keys},
                             **({"paper_accuracy": (reported[name] / 100, None)} if name in reported else {})})
    n_tseeds = len(recipe.experiment.teacher_seeds)
    t_table, t_md = _table(f"teachers (test split; mean ± std over {n_tseeds} teacher seeds)" if n_tseeds > 1 else
                           "teachers (test split)", teacher_rows, TEACHER_COLUMNS)
    notes = list(dict.fromkeys(f"{e['name']}: {e['report']['no_posterior']}" for e in teacher_reports
                               if e["report"].get("no_posterior")))  # why a calibrated row equals its teacher's
    if notes:
        t_table.caption, t_md = "\n".join(notes), t_md + "\n\n" + "\n".join(f"- {note}" for note in notes)
    extra = sorted({k for r in student_rows for k in r if k.startswith("grad_noise_")})
    seeds = len(recipe.experiment.seeds)
    s_table, s_md = _table(f"students (test split; mean ± std over {seeds} seeds)" if seeds > 1 else
                           "students (test split; one seed)",
                           student_rows, STUDENT_COLUMNS[:1] + ["paper_accuracy"] + STUDENT_COLUMNS[1:] + extra)
    paired_rows = _paired_rows(student_reports)
    spread = "mean ± standard error over seeds" if seeds > 1 else "one seed: no standard error"
    p_table, p_md = _table(f"paired with the {BASELINE} student of the same seed ({spread})",
                           paired_rows, [f"{k} {how}" for k, how in PAIRED.items()])
    sections = [("Teachers", t_table, t_md, teacher_rows), ("Students", s_table, s_md, student_rows),
                (f"Paired with the {BASELINE} student of the same seed ({spread})", p_table, p_md, paired_rows)]
    artifacts.write_json(out / plot.REPORTS, teacher_reports + [{"name": name, "report": r}
                                                                for name, reports in student_reports.items()
                                                                for r in reports])
    if plot_figures:
        plot.draw([(e["name"], e["report"]) for e in json.loads((out / plot.REPORTS).read_text())], out / "figures")
    markdown = f"# {source}\n"
    for title, table, md, rows in sections:
        if rows:
            show_table(table)
            markdown += f"\n## {title}\n\n{md}\n"
    artifacts.write_text(out / "summary.md", markdown)
    summary = artifacts.write_json(out / "summary.json", {"recipe": source, "config": run_config(recipe),
                                                          "teachers": teacher_rows, "students": student_rows,
                                                          "paired": paired_rows})
    figures = f", {out / 'figures'}/" if plot_figures else ""
    console.print(f"{stamp()} run finished in {duration(time.monotonic() - started)}: {out / 'summary.md'}{figures}")
    return summary
