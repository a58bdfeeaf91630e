"""Reports people look at: one self-contained HTML page per query run or simulation.

    from pipeline.report import write_run_report, write_simulation_report
    write_run_report("runs/query/2026-11-21", "report.html")
    write_simulation_report(rows, Path("runs/simulate/report.html"), "CIFAR-10, 3 seeds", png=None)

Pages inline their images and plots (data URIs) and fetch nothing, so they open from a laptop,
an artifact store or an e-mail attachment alike. Templates are Jinja2 (autoescaped), plots matplotlib.
"""

from pipeline.report._run import (
    ClassShare,
    RunReport,
    Thumbnail,
    build_run_report,
    render_run_report,
    write_run_report,
)
from pipeline.report._simulation import write_simulation_report

__all__ = [
    "ClassShare",
    "RunReport",
    "Thumbnail",
    "build_run_report",
    "render_run_report",
    "write_run_report",
    "write_simulation_report",
]
