"""Attribution statistics for a study's trials table: split-plot ANOVA, effects with t intervals of one model, Shapley
decomposition of comparisons, divergence, power and conditional factors."""

from ablate.analysis.comparison import Comparison, parse_comparison
from ablate.analysis.result import StudyAnalysis
from ablate.analysis.study import analyze
from ablate.analysis.table import StudyDataError, load_trials

__all__ = ["Comparison", "StudyAnalysis", "StudyDataError", "analyze", "load_trials", "parse_comparison"]
