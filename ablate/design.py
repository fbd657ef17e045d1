"""Design expansion: a study's factors and seeds become cells and trials, each a validated run config.

A cell is one combination of factor levels (a factor whose `when` condition does not hold is absent from
the cell: its setting stays as `fixed` leaves it). A trial is one (cell, seed). Identifiers are hashes
of the levels, so they stay the same when the study file is reordered or extended with new levels.

Full factorial: every combination, with `when` conditions honoured. Fractional factorial (two-level
factors only): a 2^(k-p) design from generators such as "D=ABC" (letters name factors in declaration
order; factor names joined by '*' work too, and a leading '-' flips the sign); the resolution is
computed from the defining relation and checked against the stated one.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from ablate.config import ConfigError, RunConfig, from_dict, set_dotted, to_flat_dict
from ablate.levels import cell_label
from ablate.spec import MAX_TRIALS, Study, StudyError, listing, load_study

ROMAN = {3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}


def _digest(payload: Any, length: int = 8) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Cell:
    """One combination of factor levels; factors that do not apply (a false `when`) are absent."""

    levels: dict[str, str]

    @cached_property
    def cell_id(self) -> str:
        return "c" + _digest(self.levels)

    @cached_property
    def label(self) -> str:
        return cell_label(self.levels)


@dataclass(frozen=True)
class Trial:
    """One (cell, seed) and the run config it trains (as a mapping for `from_dict`)."""

    cell: Cell
    seed: int
    tree: dict[str, Any]

    @cached_property
    def trial_id(self) -> str:
        return f"{self.cell.cell_id}-s{self.seed}"

    @cached_property
    def config_hash(self) -> str:
        """Fingerprint of the settings: a finished trial is reused only if this still matches."""
        return _digest(self.tree, 12)


@dataclass
class Design:
    """A study expanded: its cells and seeds, and where its results go."""

    study: Study
    cells: list[Cell]
    seeds: list[int]
    defining_words: list[frozenset[str]] = field(default_factory=list)  # fractional designs only
    source: Path | None = None  # the study file

    @property
    def base(self) -> Path:
        """The folder relative paths in the study file are read from: the study file's own."""
        return self.source.resolve().parent if self.source else Path.cwd()

    @property
    def output_dir(self) -> Path:
        """`output` relative to the study file; default runs/<name> beside it."""
        return (self.base / Path(self.study.output or f"runs/{self.study.name}").expanduser()).resolve()

    @property
    def experiment(self) -> str:
        return self.study.tracking.experiment or self.study.name

    def tracking_uri(self, override: str | None = None) -> str:
        """--tracking-uri, else the study's tracking.uri, else sqlite:///<absolute output dir>/mlflow.db."""
        if override:
            return override
        uri = self.study.tracking.uri
        if uri is None:
            return f"sqlite:///{self.output_dir / 'mlflow.db'}"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # a relative file
            return f"sqlite:///{(self.base / uri.removeprefix('sqlite:///')).resolve()}"
        return uri

    def run_tree(self, trial: Trial) -> dict:
        """A trial's run config with its paths made absolute (against the study file's folder)."""
        return resolve_paths(trial.tree, self.base)

    @property
    def trials(self) -> list[Trial]:
        """Seed-major order: every cell of a seed runs before the next seed (complete replicates early)."""
        return [Trial(c, s, trial_tree(self.study, c, s)) for s in self.seeds for c in self.cells]

    @property
    def resolution(self) -> int | None:
        return min((len(w) for w in self.defining_words), default=None)

    def table(self) -> pd.DataFrame:
        """One row per cell: cell id, one column per factor (empty where it does not apply), seeds."""
        rows = [
            {"cell_id": c.cell_id, **{f: c.levels.get(f, "") for f in self.study.factors}} for c in self.cells
        ]
        frame = pd.DataFrame(rows)
        frame["seeds"] = len(self.seeds)
        return frame

    def aliases(self) -> list[str]:
        """For a fractional design: what each main effect and two-factor interaction is confounded with."""
        names = list(self.study.factors)
        effects = [frozenset([f]) for f in names] + [frozenset(p) for p in itertools.combinations(names, 2)]
        lines = []
        for effect in effects:
            partners = sorted({_term(effect ^ w, names) for w in self.defining_words if len(effect ^ w) <= 3})
            if partners:
                lines.append(f"{_term(effect, names)} = {' = '.join(partners)}")
        return lines


def _term(factors: frozenset[str], order: list[str]) -> str:
    return "*".join(f for f in order if f in factors)


def load_design(path: Path) -> Design:
    """Read, validate and expand a study file; any mistake is a StudyError naming the file and key.

    Relative paths in the file (output, data.source, data.cache_dir, a sqlite tracking.uri) are read
    against the study file's folder, wherever the command runs from.
    """
    design = expand(load_study(path), str(path), base=Path(path).resolve().parent)
    design.source = Path(path)
    return design


def resolve_paths(tree: dict, base: Path | None) -> dict:
    """A run config with a relative local data.source and data.cache_dir read against `base`."""
    from ablate.data_config import GENERATED

    data = tree.get("data")
    if base is None or not isinstance(data, dict):
        return tree
    data = dict(data)
    source = data.get("source")
    scheme = source.partition(":")[0] if isinstance(source, str) and ":" in source else ""
    if isinstance(source, str) and source not in GENERATED and len(scheme) <= 1:  # a path or a glob
        data["source"] = str(base / Path(source).expanduser())
    if isinstance(data.get("cache_dir"), str):
        data["cache_dir"] = str(base / Path(data["cache_dir"]).expanduser())
    return {**tree, "data": data}


def expand(study: Study, source: str | None = None, base: Path | None = None) -> Design:
    """Cells x seeds of a study; every trial's run config is validated (errors name the study key).

    `base`: the folder relative paths are read against (the study file's); None: the current one.
    """
    _validate(resolve_paths(study.fixed, base), "fixed", "", source)
    if study.design.type == "fractional":
        cells, words = fractional_cells(study, source)
    else:
        cells, words = full_cells(study, source), []
    for name in study.factors:
        _check_levels_differ(study, name, base, source)
    levels = level_settings(study)
    for cell in cells:
        cfg = _validate(resolve_paths(cell_tree(study, cell, levels), base), "cell", cell.label, source)
        if study.resources.gpu == 0 and (needs := cfg.train.cuda_only()):
            message = (
                f"{', '.join(needs)} need a GPU, but trials get none; set resources.gpu (e.g. 0.25 or 1)"
            )
            raise StudyError([("resources.gpu", message)], source)
    return Design(study, cells, study.seed_list, words)


def _check_levels_differ(study: Study, name: str, base: Path | None, source: str | None) -> None:
    """Each level of a factor validates, and no two levels give the same run configuration."""
    seen: dict[tuple, str] = {}
    for level, settings in study.factors[name].settings(name).items():
        tree = resolve_paths(_with(study.fixed, settings), base)
        cfg = _validate(tree, f"factors.{name}.levels.{level}", "", source)
        fingerprint = tuple(sorted((k, repr(v)) for k, v in to_flat_dict(cfg).items()))
        if fingerprint in seen:
            keys = listing(sorted(settings)) or "nothing"
            message = (
                f"levels {seen[fingerprint]} and {level} give the same configuration (they set {keys} "
                "to equal values); drop one, or the analysis would credit seed noise to this factor"
            )
            raise StudyError([(f"factors.{name}.levels", message)], source)
        seen[fingerprint] = level


def _validate(tree: dict, key: str, where: str, source: str | None) -> RunConfig:
    try:
        return from_dict(RunConfig, tree)
    except ConfigError as err:
        detail = f"{err.key}: {err.message}" if err.key else err.message
        if key == "fixed":
            raise StudyError([(f"fixed.{err.key}", err.message)], source) from None
        raise StudyError([(key, f"{where + ': ' if where else ''}{detail}")], source) from None


def _with(base: dict, settings: dict[str, Any]) -> dict:
    tree = copy.deepcopy(base)
    for dotted, value in settings.items():
        set_dotted(tree, dotted, copy.deepcopy(value))
    return tree


def cell_tree(study: Study, cell: Cell, levels: dict | None = None) -> dict:
    """The fixed settings with the cell's levels applied (`levels`: level_settings(study), if at hand)."""
    levels = levels or level_settings(study)
    settings = {}
    for name, level in cell.levels.items():
        settings.update(levels[name][level])
    return _with(study.fixed, settings)


def level_settings(study: Study) -> dict[str, dict[str, dict[str, Any]]]:
    """Factor -> level -> {dotted key: value} it sets."""
    return {name: factor.settings(name) for name, factor in study.factors.items()}


def trial_tree(study: Study, cell: Cell, seed: int) -> dict:
    """A trial's run config: the cell's settings, its seed, and one torch thread per CPU it is given."""
    tree = cell_tree(study, cell)
    tree["seed"] = seed
    threads = tree.setdefault("train", {}).get("threads")
    tree["train"]["threads"] = threads or max(1, int(study.resources.cpu))
    return tree


def max_cells(study: Study) -> int:
    """The most cells the study may have: MAX_TRIALS trials over its seeds."""
    return MAX_TRIALS // len(study.seed_list)


def _too_many(study: Study, cells: str, source: str | None) -> StudyError:
    seeds = len(study.seed_list)
    message = (
        f"{cells} cells x {seeds:,} seeds is more than {MAX_TRIALS:,} trials; "
        "drop levels or seeds, or split the study into several"
    )
    return StudyError([("factors", message)], source)


def full_cells(study: Study, source: str | None = None) -> list[Cell]:
    """Every combination of levels, in declaration order (first factor slowest); `when` honoured.

    Generated lazily and stopped past the study's limit, so a huge design fails in constant time.
    """
    limit = max_cells(study)
    cells = list(itertools.islice(_combinations(list(study.factors.items())), limit + 1))
    if len(cells) > limit:
        raise _too_many(study, f"more than {limit:,}", source)
    return cells


def _combinations(factors: list):
    """Cells of `factors` [(name, Factor)], first factor slowest, one at a time (depth-first)."""
    stack: list[tuple[int, dict[str, str]]] = [(0, {})]
    while stack:
        index, levels = stack.pop()
        if index == len(factors):
            yield Cell(levels)
            continue
        name, factor = factors[index]
        if not all(levels.get(ref) in allowed for ref, allowed in factor.condition().items()):
            stack.append((index + 1, levels))
            continue
        stack += [(index + 1, {**levels, name: level}) for level in reversed(factor.level_names())]


def fractional_cells(study: Study, source: str | None = None) -> tuple[list[Cell], list[frozenset[str]]]:
    """A 2^(k-p) fraction from the study's generators, and the words of its defining relation."""
    names = list(study.factors)
    problems = [
        (f"factors.{n}", f"a fractional design needs two-level factors; {n} has {len(f.level_names())}")
        for n, f in study.factors.items()
        if len(f.level_names()) != 2
    ]
    problems += [
        (f"factors.{n}.when", "`when` conditions need `design: {type: full}`")
        for n, f in study.factors.items()
        if f.when
    ]
    if problems:
        raise StudyError(problems, source)
    generators = [_parse_generator(text, names, i, source) for i, text in enumerate(study.design.generators)]
    generated = {target for target, _, _ in generators}
    base = [n for n in names if n not in generated]
    for i, (target, word, _) in enumerate(generators):
        if not word <= set(base):
            raise StudyError(
                [
                    (
                        f"design.generators[{i}]",
                        f"{target} may only be built from base factors "
                        f"({', '.join(base)}), not from other generated factors",
                    )
                ],
                source,
            )
    if 2 ** len(base) > max_cells(study):
        raise _too_many(study, f"2^{len(base)} = {2 ** len(base):,}", source)
    words = _defining_words([frozenset({t}) | w for t, w, _ in generators])
    _check_resolution(study, words, source)
    cells = []
    for signs in itertools.product((-1, 1), repeat=len(base)):
        coded = dict(zip(base, signs, strict=True))
        for target, word, sign in generators:
            coded[target] = sign * _product(coded[f] for f in word)
        levels = {n: study.factors[n].level_names()[(coded[n] + 1) // 2] for n in names}
        cells.append(Cell(levels))
    return cells, words


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _parse_generator(text: str, names: list[str], index: int, source: str | None):
    """'D=ABC', 'D=-ABC' or 'd=a*b*c' -> (target factor, frozenset of word factors, sign)."""
    key = f"design.generators[{index}]"
    letters = {chr(ord("A") + i): n for i, n in enumerate(names[:26])}
    legend = ", ".join(f"{k}={v}" for k, v in letters.items())
    left, sep, right = (part.strip() for part in text.partition("="))
    sign = -1 if right.startswith("-") else 1
    right = right.lstrip("-").strip()
    tokens = [t.strip() for t in right.split("*")] if "*" in right or right in names else list(right)

    def factor(token: str) -> str:
        if token in names:
            return token
        if token in letters:
            return letters[token]
        raise StudyError([(key, f"unknown factor {token!r} in {text!r}; letters: {legend}")], source)

    if not sep or not left or not right:
        raise StudyError([(key, f"expected a generator like 'D=ABC' or 'd=a*b*c', got {text!r}")], source)
    target, word = factor(left), [factor(t) for t in tokens]
    if target in word or len(set(word)) != len(word) or len(word) < 2:
        raise StudyError(
            [(key, f"{text!r} must define a factor from two or more other distinct factors")], source
        )
    return target, frozenset(word), sign


def _defining_words(generator_words: list[frozenset[str]]) -> list[frozenset[str]]:
    """All products (symmetric differences) of the generator words: the defining relation I = ..."""
    words = set()
    for r in range(1, len(generator_words) + 1):
        for combo in itertools.combinations(generator_words, r):
            word = frozenset()
            for w in combo:
                word = word ^ w
            words.add(word)
    return sorted(words, key=lambda w: (len(w), sorted(w)))


def _check_resolution(study: Study, words: list[frozenset[str]], source: str | None) -> None:
    resolution = min(len(w) for w in words)
    stated = study.design.resolution
    if resolution < 3:
        raise StudyError(
            [("design.generators", "these generators alias two main effects (resolution II)")], source
        )
    if stated is not None and stated != resolution:
        found = ROMAN.get(resolution, str(resolution))
        raise StudyError(
            [
                (
                    "design.resolution",
                    f"the generators give resolution {found} ({resolution}), "
                    f"not {stated}; shortest word: {'*'.join(sorted(words[0]))}",
                )
            ],
            source,
        )


def trial_count_where(design: Design, factors: tuple[str, ...]) -> int:
    """Trials in which every factor of `factors` applies (conditional factors apply to a subset)."""
    return sum(1 for c in design.cells if all(f in c.levels for f in factors)) * len(design.seeds)


def detectable_effects(design: Design, seed_sd: float, order: int = 2) -> list[dict[str, Any]]:
    """Minimum detectable effect (80% power, alpha 0.05) of each main effect and two-factor interaction.

    Assumes the full-interaction model with seeds as blocks (residual df = (cells - 1)(seeds - 1)) and
    a residual (seed-to-seed) standard deviation `seed_sd` in the response's units.
    """
    from ablate.analysis.power import minimum_detectable_effect

    names = list(design.study.factors)
    df_resid = (len(design.cells) - 1) * (len(design.seeds) - 1)
    rows = []
    for size in range(1, order + 1):
        for term in itertools.combinations(names, size):
            if any(ref in term for f in term for ref in design.study.factors[f].condition()):
                continue  # a nested factor has no interaction with the factor it is nested in
            counts = [len(design.study.factors[f].level_names()) for f in term]
            df_num = _product(c - 1 for c in counts)
            n = trial_count_where(design, term)
            mde, meaning = (
                minimum_detectable_effect(counts, df_num, df_resid, n, seed_sd**2) if n else (0.0, "")
            )
            rows.append({"term": "*".join(term), "df": df_num, "trials": n, "mde": mde, "meaning": meaning})
    return rows


def trial_hours(design: Design, tokens_per_s: float, fixed_s: float = 0.0) -> list[float]:
    """Hours each trial takes at `tokens_per_s` (its token budget from its cell's resolved config), plus
    `fixed_s` seconds of its own besides training."""
    levels = level_settings(design.study)
    trees = (resolve_paths(cell_tree(design.study, c, levels), design.base) for c in design.cells)
    budgets = [from_dict(RunConfig, tree).train.tokens for tree in trees]
    return [(fixed_s + tokens / tokens_per_s) / 3600 for _ in design.seeds for tokens in budgets]
