"""The study file: a strict schema for factors, seeds, fixed settings, responses and resources.

A study YAML is validated here (shape, names, levels); `ablate.design` then expands it into trials and
validates every trial's run configuration. Every user mistake is a `ConfigError` naming the file, the
key path and, where there is a list of them, the valid choices.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ablate.config import ConfigError, brief, load_yaml
from ablate.levels import level_name
from ablate.responses import RESPONSES

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_SEEDS = 1000  # replicates per cell; more is a typo (and 5-10 already give tight intervals)
MAX_SEED = 2**31 - 1  # seeds feed torch and numpy generators
MAX_TRIALS = 10_000  # cells x seeds of one study; split a larger one into several studies
MAX_LEVELS = 1000  # levels of one factor


def listing(names, limit: int = 12) -> str:
    """Names joined by commas, at most `limit` of them (messages stay one readable line)."""
    names = [str(n) for n in names]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(brief(n) if len(n) > 40 else n for n in names[:limit]) + more


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'gamma_scale': 2}} and {'model.gamma_scale': 2} both become {'model.gamma_scale': 2}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Factor(Strict):
    """One crossed factor. Plain levels set `key`; named levels map a name to the settings it changes."""

    levels: Any  # [values] or {name: value or {key: value, ...}}
    key: str | None = None  # dotted config key; default model.<factor name>
    when: dict[str, Any] | None = None  # applies only where these factors take these levels

    @field_validator("levels")
    @classmethod
    def _at_least_two(cls, levels: Any) -> list | dict:
        if not isinstance(levels, list | dict):
            raise ValueError(f"expected a list of levels or a mapping of named levels, got {brief(levels)}")
        if len(levels) < 2:
            raise ValueError("a factor needs at least two levels (put a single setting under `fixed`)")
        if len(levels) > MAX_LEVELS:
            raise ValueError(f"{len(levels):,} levels; a factor takes at most {MAX_LEVELS:,}")
        names = [level_name(v) for v in levels] if isinstance(levels, list) else list(levels)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate level names: {listing(duplicates)}")
        if isinstance(levels, list) and any(isinstance(v, dict | list) for v in levels):
            raise ValueError(
                "plain levels must be scalars; use a mapping {name: {key: value}} for named levels"
            )
        return levels

    @field_validator("when")
    @classmethod
    def _when_lists(cls, when: dict | None) -> dict | None:
        if when is not None and not when:
            raise ValueError("`when` needs at least one factor: {factor: [levels]}")
        return when

    def level_names(self) -> list[str]:
        return [level_name(v) for v in self.levels] if isinstance(self.levels, list) else list(self.levels)

    def settings(self, factor: str) -> dict[str, dict[str, Any]]:
        """Level name -> {dotted config key: value} that the level sets."""
        key = self.key or f"model.{factor}"
        if isinstance(self.levels, list):
            return {level_name(v): {key: v} for v in self.levels}
        return {
            name: flatten(value) if isinstance(value, dict) else {key: value}
            for name, value in self.levels.items()
        }

    def condition(self) -> dict[str, list[str]]:
        """The `when` condition as {factor: [level names]} ({} when the factor always applies)."""
        when = self.when or {}
        return {f: [level_name(v) for v in (vs if isinstance(vs, list) else [vs])] for f, vs in when.items()}


class Responses(Strict):
    primary: str = "val_loss"
    secondary: list[str] = Field(default_factory=list)

    @field_validator("primary")
    @classmethod
    def _known_primary(cls, name: str) -> str:
        return _known_response(name)

    targets: list[float] = Field(default_factory=list)  # validation losses to time: tokens_to_<target>

    @field_validator("secondary")
    @classmethod
    def _known_secondary(cls, names: list[str]) -> list[str]:
        return [_known_response(n) for n in names]

    @field_validator("targets")
    @classmethod
    def _positive_targets(cls, targets: list[float]) -> list[float]:
        if any(not 0 < t < float("inf") for t in targets) or len(set(targets)) != len(targets):
            raise ValueError(
                f"targets must be distinct positive losses in nats, e.g. [4.0, 3.5]; got {targets}"
            )
        return targets


def _known_response(name: str) -> str:
    if name not in RESPONSES:
        raise ValueError(f"unknown response {brief(name)}; choose from: {', '.join(RESPONSES)}")
    return name


class ComparisonSpec(Strict):
    """A named comparison to decompose: factor levels of the baseline and of the target."""

    name: str
    baseline: dict[str, Any]
    target: dict[str, Any]

    def levels(self, side: str) -> dict[str, str]:
        return {f: level_name(v) for f, v in getattr(self, side).items()}


class Resources(Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)
    # run the trials as clients of an NVIDIA MPS daemon, so that trials sharing a GPU run side by side;
    # auto: where they share one (0 < gpu < 1) and this machine can start the daemon (ablate.launch.use_mps)
    mps: bool | Literal["auto"] = False

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"gpu must be a fraction in [0, 1] or a whole number of GPUs, got {gpu}")
        return gpu

    @property
    def asks_for_mps(self) -> bool:
        """Whether trials are to run under MPS where this machine can: `true`, or `auto` with trials that
        share a GPU (0 < gpu < 1). `ablate.launch.use_mps` decides a launch by it; `ablate plan` prices
        by it."""
        return self.mps is True or (self.mps == "auto" and 0 < self.gpu < 1)

    @field_validator("mps", mode="before")
    @classmethod
    def _true_false_or_auto(cls, mps: Any) -> Any:
        if mps is not True and mps is not False and mps != "auto":
            raise ValueError(f"expected true, false or auto, got {brief(mps)}")
        return mps

    @field_validator("mps")
    @classmethod
    def _mps_needs_gpus(cls, mps: bool | str, info: ValidationInfo) -> bool | str:
        if mps is True and info.data.get("gpu") == 0:
            raise ValueError(
                "mps lets trials that share a GPU run side by side, but trials get no GPU; "
                "set resources.gpu (e.g. 0.25: four trials per GPU) or mps: false"
            )
        return mps


class Tracking(Strict):
    uri: str | None = None  # None: sqlite:///<absolute output dir>/mlflow.db
    experiment: str | None = None  # None: the study name
    system_metrics: bool = True  # sample CPU/memory/GPU memory of each trial into its run
    system_metrics_interval: float = Field(default=10.0, gt=0)  # seconds
    flush_seconds: float = Field(
        default=5.0, ge=0
    )  # at most this long between metric batches (0: every call)


class DesignSpec(Strict):
    """The `design:` section of a study file: the full factorial, or a fraction of it by generators."""

    type: Literal["full", "fractional"] = "full"
    generators: list[str] = Field(default_factory=list)  # fractional: e.g. ["D=ABC"] or ["d=a*b*c"]
    resolution: int | None = Field(default=None, ge=3)  # fractional: stated resolution (checked)

    @model_validator(mode="after")
    def _generators_fit_type(self) -> DesignSpec:
        if self.type == "full" and (self.generators or self.resolution is not None):
            raise ValueError("generators/resolution only apply to `type: fractional`")
        if self.type == "fractional" and not self.generators:
            raise ValueError('a fractional design needs generators, e.g. generators: ["D=ABC"]')
        return self


class Study(Strict):
    """A designed study: crossed factors x seeds on top of fixed settings."""

    name: str
    description: str = ""
    factors: dict[str, Factor]
    seeds: Any = 3  # n -> seeds 0..n-1, or an explicit list
    fixed: dict[str, Any] = Field(default_factory=dict)  # sections model/data/optim/train, as in a run config
    responses: Responses = Field(default_factory=Responses)
    comparisons: list[ComparisonSpec] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(default=None, ge=1)  # None: as many as the resources allow
    retries: int = Field(default=2, ge=0)  # re-runs of a trial that failed (never of a diverged one)
    output: str | None = None  # output directory, relative to the study file; None: runs/<name>
    tracking: Tracking = Field(default_factory=Tracking)
    design: DesignSpec = Field(default_factory=DesignSpec)

    @field_validator("name")
    @classmethod
    def _simple_name(cls, name: str) -> str:
        if not NAME.match(name):
            raise ValueError(f"name {brief(name)} may hold only letters, digits, '_', '.', '-' (no spaces)")
        return name

    @field_validator("factors")
    @classmethod
    def _some_factors(cls, factors: dict[str, Factor]) -> dict[str, Factor]:
        if not factors:
            raise ValueError("a study needs at least one factor")
        bad = [f for f in factors if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", f)]
        if bad:
            raise ValueError(f"factor names must be identifiers (letters, digits, '_'): {listing(bad)}")
        return factors

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, seeds: Any) -> int | list[int]:
        is_int = isinstance(seeds, int) and not isinstance(seeds, bool)
        if not is_int and not (isinstance(seeds, list) and all(type(s) is int for s in seeds)):
            raise ValueError(f"expected a number of seeds or a list of integer seeds, got {brief(seeds)}")
        count = seeds if isinstance(seeds, int) else len(seeds)
        if count < 1:
            raise ValueError("a study needs at least one seed (seeds: 3, or seeds: [0, 1, 2])")
        if count > MAX_SEEDS:
            raise ValueError(f"{count:,} seeds; a study takes at most {MAX_SEEDS:,} (5-10 are usual)")
        if isinstance(seeds, list) and (len(set(seeds)) != len(seeds) or min(seeds) < 0):
            raise ValueError(f"seeds must be distinct integers >= 0, got {brief(seeds)}")
        if isinstance(seeds, list) and max(seeds) > MAX_SEED:
            raise ValueError(f"seeds must be at most {MAX_SEED} (2^31 - 1), got {brief(max(seeds))}")
        return seeds

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


class StudyError(ConfigError):
    """One or more mistakes in a study file; each problem is (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        key, message = problems[0]
        if len(problems) > 1:
            message += "".join(f"\n  {k}: {m}" for k, m in problems[1:])
        super().__init__(key, message, source)


def load_study(path: Path) -> Study:
    """Read and validate a study file (shape, names, levels, references between factors)."""
    tree = load_yaml(path)
    try:
        study = Study.model_validate(tree)
    except ValidationError as err:
        raise StudyError([_problem(e) for e in err.errors()], source=str(path)) from None
    problems = check_references(study)
    if problems:
        raise StudyError(problems, source=str(path))
    return study


def check_references(study: Study) -> list[tuple[str, str]]:
    """Cross-field checks: `when` and comparisons name real factors and levels; keys set once."""
    problems = []
    order = list(study.factors)
    for name, factor in study.factors.items():
        for ref, levels in factor.condition().items():
            problems += _check_levels(study, f"factors.{name}.when.{ref}", ref, levels, exclude=name)
            if ref in order and order.index(ref) > order.index(name):
                problems.append(
                    (f"factors.{name}.when.{ref}", f"declare {ref} before {name}, which depends on it")
                )
    for i, comparison in enumerate(study.comparisons):
        for side in ("baseline", "target"):
            for ref, level in comparison.levels(side).items():
                problems += _check_levels(study, f"comparisons[{i}].{side}.{ref}", ref, [level])
        problems += _comparison_sides(study, f"comparisons[{i}]", comparison)
    return problems + _check_keys(study)


def _comparison_sides(study: Study, key: str, comparison: ComparisonSpec) -> list[tuple[str, str]]:
    """Both sides name the same factors, except a conditional factor absent where it does not apply."""
    sides = {side: comparison.levels(side) for side in ("baseline", "target")}
    if any(f not in study.factors for levels in sides.values() for f in levels):
        return []  # reported by _check_levels
    problems = []
    for side, levels in sides.items():
        other = sides["target" if side == "baseline" else "baseline"]
        for name in sorted(other.keys() - levels.keys()):
            if _applies(study, name, levels):
                message = (
                    f"{side} gives no level of {name} but the other side does ({name}={other[name]}); "
                    "name the same factors on both sides"
                )
                problems.append((f"{key}.{side}", message))
        for name in levels:
            if not _applies(study, name, levels):
                message = f"{name} does not apply where {_condition_text(study, name)} does not hold"
                problems.append((f"{key}.{side}.{name}", message))
    if not problems and sides["baseline"] == sides["target"]:
        problems.append((key, "baseline and target are the same configuration"))
    return problems


def _applies(study: Study, name: str, levels: dict[str, str]) -> bool:
    """Whether factor `name` applies in a configuration with these levels (unnamed factors: it may)."""
    condition = study.factors[name].condition()
    return all(ref not in levels or levels[ref] in allowed for ref, allowed in condition.items())


def _condition_text(study: Study, name: str) -> str:
    condition = study.factors[name].condition()
    return " and ".join(f"{ref} in [{listing(allowed)}]" for ref, allowed in condition.items())


def _check_levels(study: Study, key: str, ref: str, levels: list[str], exclude: str = "") -> list:
    names = [f for f in study.factors if f != exclude]
    if ref not in names:
        return [(key, f"unknown factor {brief(ref)}; factors: {listing(names)}")]
    valid = study.factors[ref].level_names()
    bad = [level for level in levels if level not in valid]
    return [(key, f"unknown level {brief(level)} of {ref}; levels: {listing(valid)}") for level in bad]


def _check_keys(study: Study) -> list[tuple[str, str]]:
    owner: dict[str, str] = {}
    problems = []
    for name, factor in study.factors.items():
        keys = {k for settings in factor.settings(name).values() for k in settings}
        for key in sorted(keys):
            if key.split(".")[0] in ("seed", "data_seed"):
                problems.append((f"factors.{name}", f"{key} is set by `seeds`, not by a factor"))
            elif key in owner:
                problems.append((f"factors.{name}", f"{key} is already set by factor {owner[key]}"))
            owner[key] = name
    for key in ("seed", "data_seed"):
        if key in study.fixed:
            problems.append((f"fixed.{key}", "seeds come from the study's `seeds`, not from `fixed`"))
    return problems


TYPE_MESSAGES = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping of keys",
    "model_type": "expected a mapping of keys",
}


def _problem(error: dict) -> tuple[str, str]:
    loc, kind = error["loc"], error["type"]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "extra_forbidden":
        return key, f"unknown key; valid keys here: {', '.join(_fields_at(loc[:-1]))}"
    if kind == "missing":
        return key, "required key is missing"
    if kind == "literal_error":
        return key, f"must be one of {error['ctx']['expected']}, got {brief(error['input'])}"
    if kind == "value_error":
        return key, str(error["ctx"]["error"])
    message = TYPE_MESSAGES.get(kind, error["msg"][0].lower() + error["msg"][1:])
    return key, f"{message}, got {brief(error['input'])}"


def _fields_at(loc: tuple) -> list[str]:
    """The keys valid in the mapping at `loc` of a study (walking the schema's annotations)."""
    node: Any = Study
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            node = node.model_fields[part].annotation
        else:  # dict[str, X] or list[X]: this part is a key or an index into it
            node = typing.get_args(node)[-1]
        if typing.get_origin(node) in (typing.Union, type(int | None)):
            node = next(a for a in typing.get_args(node) if a is not type(None))
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []
