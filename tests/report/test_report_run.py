"""`lplgrad manifest report` on a tiny committed run, built without Ray (as tests/ray_jobs/test_manifest_cli.py).

The run: a 40-sample PNG pool in 3 shards, made-up scores for every row, two rows that failed, an
exact top-6 and commit_run. Checked: one inlined image per selected row, nothing fetched from a
network, the cap stated on the page, a missing image explained, the class mix and errors, an S3 run,
and the page rendered by a real browser (headless Chromium) with its images decoded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from _committed_run import FAILED, K, commit_fake_run

from pipeline.manifest.export import open_run
from pipeline.pools import build_pool, synthetic
from pipeline.report import build_run_report, render_run_report, write_run_report
from ray_jobs import cli


def make_run(
    pool_uri: str, out: str, options: dict[str, Any] | None = None, ghost: str | None = None, k: int = K
) -> str:
    """Build a pool and commit a run over it as the query job would; returns the run URI."""
    build_pool(
        synthetic(40, seed=1, num_classes=3, image_size=12),
        pool_uri,
        encoding="png",
        shard_samples=15,
        storage_options=options,
    )
    commit_fake_run(pool_uri, out, "2026-11-21", options, ghost, k)
    return f"{out.rstrip('/')}/2026-11-21"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("report")
    return make_run(str(root / "pool"), str(root / "queries"))


def thumbs(html: str) -> list[str]:
    return re.findall(r'<img class="thumb" src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', html)


def test_one_inlined_image_per_selected_row_and_nothing_fetched(local_run: str) -> None:
    run = open_run(local_run)
    report = build_run_report(run)
    html = render_run_report(report)
    assert len(thumbs(html)) == K == report.selected
    assert [t.rank for t in report.thumbnails] == list(range(1, K + 1))
    # Self-contained: every src/href is a data URI; no script, stylesheet or font comes from elsewhere.
    assert not re.findall(r'(?:src|href)="(?!data:)', html)
    assert "<script" not in html and "@import" not in html and "url(" not in html
    # The inputs, the pool side and the errors.
    assert "cd" * 32 in html and "lplgrad" in html and f"{K} <span" in html
    assert report.pool_rows == 40 - len(FAILED) and report.histogram and report.histogram.startswith("data:image/png")
    assert sum(c.pool for c in report.class_mix) == 40 - len(FAILED)
    assert sum(c.selected for c in report.class_mix) == K
    assert report.errors_total == len(FAILED) and html.count("non-finite logits") == len(FAILED)


def test_large_selection_is_capped_and_the_page_says_so(local_run: str) -> None:
    html = render_run_report(build_run_report(open_run(local_run), max_images=2))
    assert len(thumbs(html)) == 2
    assert "Showing ranks 1&ndash;2 of 6 selected (capped at 2)" in html


def test_missing_image_is_explained(tmp_path: Path) -> None:
    run = make_run(str(tmp_path / "pool"), str(tmp_path / "queries"), ghost="ghost_000")
    report = build_run_report(open_run(run))
    assert report.thumbnails[0].key == "ghost_000" and report.thumbnails[0].src is None
    assert "not in shard" in report.thumbnails[0].missing
    html = render_run_report(report)
    assert len(thumbs(html)) == K - 1 and "1 selected image(s) could not be shown" in html


def test_cli_writes_the_report(local_run: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.html"
    assert cli.main(["manifest", "report", local_run, "--out", str(out)]) == 0
    assert f"{K} of {K} selected images" in capsys.readouterr().out
    assert len(thumbs(out.read_text())) == K


def test_s3_run(s3_server) -> None:
    options = s3_server.storage_options
    run = make_run(s3_server.uri("pool"), s3_server.uri("queries"), options)
    out = s3_server.uri("report.html")
    report = write_run_report(run, out, options)
    assert sum(t.src is not None for t in report.thumbnails) == K
    import fsspec

    with fsspec.open(out, "rb", **options) as handle:
        assert len(thumbs(handle.read().decode())) == K


def _chromium() -> str | None:
    return next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
    )


@pytest.mark.skipif(
    _chromium() is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)",
)
def test_report_renders_in_a_real_browser(local_run: str, tmp_path: Path) -> None:
    """Chromium loads the page from disk with networking off, decodes every thumbnail, and a
    screenshot of it is saved next to the test's files."""
    page = tmp_path / "report.html"
    write_run_report(local_run, str(page))
    # A probe appended to a copy: counts thumbnails the browser decoded (naturalWidth > 0) into the DOM.
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => {"
            "const ok = [...document.querySelectorAll('img.thumb')].filter(i => i.complete && i.naturalWidth > 0);"
            "document.body.setAttribute('data-decoded', ok.length);"
            "document.body.setAttribute('data-imgs', document.querySelectorAll('img.thumb').length);});"
            "</script></body>",
        )
    )
    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-imgs="{K}"' in dom.stdout and f'data-decoded="{K}"' in dom.stdout, dom.stdout[:500]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")
