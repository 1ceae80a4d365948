"""The attribution report: one self-contained HTML page per run, and PNG figures for papers.

The report renders saved artifacts (scores, ``run.json``, NDA heatmaps, LDS results) and never
recomputes them.
"""

from diffattr.report._heatmap import save_heatmap
from diffattr.report._report import write_report

__all__ = ["save_heatmap", "write_report"]
