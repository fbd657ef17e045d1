"""The report from a study's MLflow record: the body of `ablate report` (and of `ablate quickstart`'s end)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console

from ablate import tracking
from ablate.analysis import Comparison, StudyAnalysis, analyze
from ablate.analysis.curves import target_column, with_tokens_to_targets
from ablate.report.write import summary_text, write_report


def from_study(design, record: tracking.StudyRecord, out_dir: Path, console: Console) -> dict[str, Path]:
    """Write the study's report into `out_dir`, log it to the study's parent run and print the summary;
    returns the files by name. Raises StudyDataError when the trials cannot be analysed."""
    trials, curves = study_results(design, record)
    analysis = analyze_study(design, trials)
    study = design.study
    title = f"{study.name}: attribution"
    paths = write_report(analysis, out_dir, curves=curves, title=title, targets=study.responses.targets)
    for name, frame in (("trials.csv", trials), ("curves.csv", curves)):  # inputs of `ablate analyze`
        frame.to_csv(out_dir / name, index=False)
        paths[name] = out_dir / name
    files = {f"report/{name}": path for name, path in paths.items()}
    tracking.log_artifacts(record.client, record.parent_run_id, files)
    console.print(summary_text(analysis))
    console.print(f"report: {out_dir}  (also logged to the parent run {record.parent_run_id})")
    return paths


def study_results(design, record: tracking.StudyRecord) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's trials table and curves, restricted to the trials the study file declares now."""
    study = design.study
    responses = [study.responses.primary, *study.responses.secondary]
    trials, curves = record.tables(list(study.factors), responses)
    declared = {t.trial_id for t in design.trials}
    trials = trials[trials["trial_id"].isin(declared)].reset_index(drop=True)
    if trials.empty:
        where = record.client.tracking_uri
        raise LookupError(f"no finished trials of {study.name} at {where} yet; run the study first")
    curves = curves[curves["trial_id"].isin(declared)].reset_index(drop=True)
    return with_tokens_to_targets(trials, curves, study.responses.targets), curves


def analyze_study(design, trials: pd.DataFrame) -> StudyAnalysis:
    """The analysis of a study's trials with its factors, responses, comparisons and conditions."""
    study = design.study
    comparisons = [Comparison(c.name, c.levels("baseline"), c.levels("target")) for c in study.comparisons]
    conditions = {name: f.condition() for name, f in study.factors.items() if f.when}
    vocab = trials["vocab_size"].dropna()
    return analyze(
        trials,
        list(study.factors),
        study.responses.primary,
        comparisons=comparisons,
        secondary=[*study.responses.secondary, *map(target_column, study.responses.targets)],
        conditions=conditions or None,
        vocab_size=int(vocab.iloc[0]) if len(vocab) else None,
    )
