"""Named comparisons: a baseline configuration and a target configuration of factor levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ablate.analysis.table import StudyDataError
from ablate.levels import level_name

ARROW = "->"


@dataclass(frozen=True)
class Comparison:
    """Baseline -> target, each a partial assignment {factor: level}.

    A factor named on one side only is held at that level on both sides (where it applies);
    a factor named on neither side is averaged over its levels.
    """

    name: str
    baseline: dict[str, str] = field(default_factory=dict)
    target: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for side in ("baseline", "target"):
            levels = {str(name): level_name(level) for name, level in getattr(self, side).items()}
            object.__setattr__(self, side, levels)

    def validate(self, levels: Mapping[str, Sequence[str]]) -> None:
        """Raise StudyDataError naming the valid choices if a factor or level is unknown."""
        for side in (self.baseline, self.target):
            for factor, level in side.items():
                _check_known(factor, level, levels)
        if self.baseline == self.target:
            raise StudyDataError(f"comparison {self.name!r}: baseline and target are the same")


def parse_comparison(text: str, levels: Mapping[str, Sequence[str]] | None = None) -> Comparison:
    """Parse 'a=x,b=y -> a=z,b=w' (optionally prefixed 'NAME:'); check names when levels are given."""
    name, _, body = text.partition(":") if ":" in text.split(ARROW)[0] else ("", "", text)
    if body.count(ARROW) != 1:
        raise StudyDataError(
            f"comparison {text!r}: expected 'factor=level,... -> factor=level,...' with one '->'"
        )
    left, right = body.split(ARROW)
    comparison = Comparison(
        name=name.strip() or " -> ".join(part.strip() for part in (left, right)),
        baseline=_parse_side(left, text),
        target=_parse_side(right, text),
    )
    if levels is not None:
        comparison.validate(levels)
    return comparison


def _parse_side(side: str, text: str) -> dict[str, str]:
    assignment: dict[str, str] = {}
    for item in side.split(","):
        factor, equals, level = (part.strip() for part in item.partition("="))
        if not equals or not factor or not level:
            raise StudyDataError(f"comparison {text!r}: {item.strip()!r} is not 'factor=level'")
        if factor in assignment:
            raise StudyDataError(f"comparison {text!r}: factor {factor!r} is given twice on one side")
        assignment[factor] = level
    return assignment


def _check_known(factor: str, level: str, levels: Mapping[str, Sequence[str]]) -> None:
    if factor not in levels:
        raise StudyDataError(f"unknown factor {factor!r} in a comparison; factors: {list(levels)}")
    if level not in levels[factor]:
        raise StudyDataError(
            f"unknown level {level!r} of factor {factor!r} in a comparison; levels: {list(levels[factor])}"
        )
