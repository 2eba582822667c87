"""Reports over many runs: statistics tables, plots, Markdown and a self-contained HTML page."""

from fimlora.reporting.names import Grid, ModuleName, module_grid, parse_module_name
from fimlora.reporting.report import ReportFiles, build_report

__all__ = ["Grid", "ModuleName", "ReportFiles", "build_report", "module_grid", "parse_module_name"]
