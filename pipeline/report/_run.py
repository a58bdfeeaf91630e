"""The report of one committed query run: what was selected, as pictures, against the pool.

    write_run_report("s3://bucket/queries/2026-11-21", "report.html")   # or `lplgrad manifest report`

One self-contained HTML page (pipeline/report/_html.py): the run's inputs; a thumbnail grid of the
selected images in rank order with score, predicted class and probability; a histogram of the
acquisition values of the whole pool against the selection's; the predicted-class mix of the
selection against the pool's; the error rows with their reasons. The pool side is streamed from
`scores/` one part at a time (memory O(batch + bins + classes)); images are read only from the
shards holding the shown keys, each shard once, and at most `max_images` of them are shown.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.acquisition import acquisition_values
from pipeline.manifest import iter_scores, load_errors
from pipeline.manifest.export import CommittedRun, open_run, run_summary
from pipeline.pools import IMAGE_EXTENSIONS, PoolError, ResolvedPool, iter_shard_samples, resolve_pool
from pipeline.report._html import data_uri, figure_data_uri, render
from pipeline.storage import filesystem_for, write_bytes_atomic

__all__ = ["ClassShare", "RunReport", "Thumbnail", "build_run_report", "render_run_report", "write_run_report"]

MAX_IMAGES = 1000  # thumbnails per page; the rest of a larger selection is listed as a count
MAX_ERRORS = 500
HISTOGRAM_BINS = 60
_INLINE_BYTES = 16_384  # images up to this size are inlined as stored; larger ones become thumbnails
_THUMB_PIXELS = 192
_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class Thumbnail:
    """One selected row as the grid shows it.

    Attributes:
        rank: 1-based rank in the selection.
        key: Sample key.
        score: Acquisition value (None when not finite).
        pred_class: Arg-max class index, None when the run has none.
        class_name: Its name from the pool's index, else None.
        pred_prob: Probability of the predicted class.
        src: The image as a data URI, None when it was not found.
        missing: Why there is no image ("" when there is one).
    """

    rank: int
    key: str
    score: float | None
    pred_class: int | None
    class_name: str | None
    pred_prob: float | None
    src: str | None
    missing: str = ""


@dataclass(frozen=True)
class ClassShare:
    """Predicted class counts of the selection and of the pool's scored rows."""

    label: str
    selected: int
    pool: int
    selected_fraction: float
    pool_fraction: float


@dataclass(frozen=True)
class RunReport:
    """Everything the page shows, gathered once (render it with :func:`render_run_report`).

    Attributes:
        summary: `pipeline.manifest.export.run_summary` of the run (inputs, counts, statistics).
        thumbnails: The first `max_images` selected rows, rank order.
        selected: Rows in the selection.
        max_images: The cap the thumbnails were taken under.
        histogram: The score histogram as a PNG data URI (None when the run has no finite scores).
        histogram_note: What the histogram compares, or why it is missing.
        class_mix: One entry per predicted class seen in the pool or the selection.
        errors: Up to `max_errors` error rows (key, shard, reason).
        errors_total: Rows in errors.parquet.
        pool_rows: Scored pool rows read from `scores/` (finite acquisition values).
        generated_at: UTC time the report was built.
    """

    summary: dict[str, Any]
    thumbnails: list[Thumbnail]
    selected: int
    max_images: int
    histogram: str | None
    histogram_note: str
    class_mix: list[ClassShare]
    errors: list[dict[str, Any]]
    errors_total: int
    pool_rows: int
    generated_at: str


# -- the pool side: streamed from scores/ -------------------------------------------------------


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _histogram_edges(summary: Mapping[str, Any], selected: np.ndarray) -> np.ndarray | None:
    """Bin edges spanning the pool (min/max are exact in the manifest) and the selection's finite values."""
    ends = [float(v) for v in (summary.get("min"), summary.get("max")) if v is not None and math.isfinite(v)]
    ends += [float(selected.min()), float(selected.max())] if selected.size else []
    if not ends:
        return None
    low, high = min(ends), max(ends)
    return np.linspace(low, high if high > low else low + 1.0, HISTOGRAM_BINS + 1)


def _pool_counts(
    run: CommittedRun, strategy: str, seed: int, edges: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray, int]:
    """(histogram counts of acquisition values, predicted-class counts, finite rows) over scores/.

    Values are recomputed from the stored columns with the run's strategy and seed, exactly as the
    job computed `score` (stochastic perturbation is not part of it).
    """
    counts = None if edges is None else np.zeros(len(edges) - 1, dtype=np.int64)
    classes = np.zeros(0, dtype=np.int64)
    rows = 0
    for batch in iter_scores(run.uri, run.storage_options):
        columns = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
        failed = (
            np.array([e is not None for e in columns["error"]], dtype=bool)
            if "error" in columns
            else np.zeros(batch.num_rows, bool)
        )
        values = np.asarray(acquisition_values(strategy, columns, seed=seed), dtype=np.float64)
        ok = ~failed & np.isfinite(values)
        rows += int(ok.sum())
        if counts is not None:
            # Clip into the edge bins: the manifest's min/max cover the pool, clipping only absorbs rounding.
            counts += np.histogram(np.clip(values[ok], edges[0], edges[-1]), bins=edges)[0]
        if "pred_class" in columns:
            predicted = batch.column("pred_class").filter(pa.array(~failed)).drop_null().to_numpy().astype(np.int64)
            found = np.bincount(predicted[predicted >= 0])
            if len(found) > len(classes):
                classes = np.pad(classes, (0, len(found) - len(classes)))
            classes[: len(found)] += found
    return counts, classes, rows


def _histogram_png(edges: np.ndarray, pool: np.ndarray, selected: np.ndarray, strategy: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 3.2), dpi=110)
    widths = np.diff(edges)
    axes.bar(edges[:-1], pool, width=widths, align="edge", color="#bbbbbb", label=f"pool ({int(pool.sum()):,} rows)")
    chosen = np.histogram(np.clip(selected, edges[0], edges[-1]), bins=edges)[0]
    axes.bar(
        edges[:-1],
        chosen,
        width=widths,
        align="edge",
        color="#e45756",
        alpha=0.85,
        label=f"selected ({int(chosen.sum()):,} rows)",
    )
    axes.set_yscale("log")  # the selection is a sliver of the pool
    axes.set_xlabel(f"acquisition value ({strategy}; higher = more worth labeling)")
    axes.set_ylabel("rows (log scale)")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure_data_uri(figure)


def _class_mix(selected: Sequence[Any], pool: np.ndarray, names: Sequence[str] | None) -> list[ClassShare]:
    chosen = np.bincount(np.array([int(c) for c in selected if c is not None and c >= 0], dtype=np.int64))
    width = max(len(chosen), len(pool))
    chosen, pool = np.pad(chosen, (0, width - len(chosen))), np.pad(pool, (0, width - len(pool)))
    total_chosen, total_pool = max(int(chosen.sum()), 1), max(int(pool.sum()), 1)
    return [
        ClassShare(
            f"{c}: {names[c]}" if names and c < len(names) else str(c),
            int(chosen[c]),
            int(pool[c]),
            chosen[c] / total_chosen,
            pool[c] / total_pool,
        )
        for c in range(width)
        if chosen[c] or pool[c]
    ]


# -- the selection side: images from the pool's shards ---------------------------------------------


def _thumbnail_uri(files: Mapping[str, bytes]) -> str:
    """A sample's image as a data URI: as stored when small, else a JPEG/PNG thumbnail."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        raise ValueError(f"no image file (has {', '.join(sorted(files)) or 'nothing'})")
    data = files[ext]
    if len(data) <= _INLINE_BYTES:
        return data_uri(data, _MIME[ext])
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((_THUMB_PIXELS, _THUMB_PIXELS))
        out = io.BytesIO()
        if image.mode in ("RGBA", "LA", "P"):
            image.save(out, format="PNG")
            return data_uri(out.getvalue(), "image/png")
        image.convert("RGB").save(out, format="JPEG", quality=85)
        return data_uri(out.getvalue(), "image/jpeg")


def _read_images(pool: ResolvedPool, wanted: Mapping[str, str | None]) -> tuple[dict[str, str], dict[str, str]]:
    """key -> data URI for the keys found in their recorded shards, and key -> why for the others.

    Shards are matched by URI, then by file name (a pool copied elsewhere keeps its shard names);
    each shard is read once, in parallel (object-store latency), and stops once its keys are seen.
    """
    by_uri = {s.uri: s for s in pool.shards}
    by_name = {posixpath.basename(s.uri): s for s in reversed(pool.shards)}
    planned: dict[str, set[str]] = {}
    missing: dict[str, str] = {}
    for key, shard_uri in wanted.items():
        shard = by_uri.get(shard_uri or "") or by_name.get(posixpath.basename(shard_uri or ""))
        if shard is None:
            missing[key] = f"its shard {shard_uri!r} is not in pool {pool.uri}"
        else:
            planned.setdefault(shard.uri, set()).add(key)

    def scan(uri: str) -> tuple[dict[str, str], dict[str, str]]:
        left, found, failed = set(planned[uri]), {}, {}
        try:
            for sample in iter_shard_samples(pool.fs, by_uri[uri].path):
                if sample.key in left:
                    left.discard(sample.key)
                    try:
                        found[sample.key] = _thumbnail_uri(sample.files)
                    except (ValueError, OSError) as err:
                        failed[sample.key] = f"image not readable: {err}"
                    if not left:
                        break
        except (PoolError, OSError) as err:
            return found, {**failed, **{key: f"shard {uri} could not be read: {err}" for key in left}}
        return found, {**failed, **{key: f"not in shard {uri}" for key in left}}

    images: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(len(planned), 1))) as threads:
        for found, failed in threads.map(scan, list(planned)):
            images.update(found)
            missing.update(failed)
    return images, missing


# -- building, rendering, writing -----------------------------------------------------------------


def build_run_report(
    run: CommittedRun, *, max_images: int = MAX_IMAGES, max_errors: int = MAX_ERRORS, pool: str | None = None
) -> RunReport:
    """Gather what the page shows: one pass over `scores/`, the shards of the shown keys, errors.

    Args:
        run: From `pipeline.manifest.export.open_run`.
        max_images: Thumbnails shown (rank order); the page says when the selection is larger.
        max_errors: Error rows listed; the page says how many there are in all.
        pool: The pool's current location when it moved since the run (shards matched by name).

    Returns:
        The report's contents.

    Raises:
        ValueError: If `max_images` is negative.
    """
    if max_images < 0:
        raise ValueError(f"max_images cannot be negative, got {max_images}")
    summary = run_summary(run, top=0)
    strategy = str(summary.get("strategy"))
    seed = int((summary.get("strategy_params") or {}).get("seed", 0))
    selection = run.selection()
    scores = np.array([np.nan if v is None else v for v in selection.column("score").to_pylist()], dtype=np.float64)
    edges = _histogram_edges(summary.get("score_summary") or {}, scores[np.isfinite(scores)])
    try:
        pool_hist, pool_classes, pool_rows = _pool_counts(run, strategy, seed, edges)
        note = f"all {pool_rows:,} scored rows of the pool (from scores/) against the {len(selection):,} selected"
    except (KeyError, ValueError) as err:  # a strategy whose values are not a function of the stored columns
        pool_hist, pool_classes, pool_rows = None, np.zeros(0, dtype=np.int64), 0
        note = f"pool histogram not available: {err}"
    histogram = None
    if edges is not None and pool_hist is not None:
        histogram = _histogram_png(edges, pool_hist, scores[np.isfinite(scores)], strategy)
    elif edges is None:
        note = "no finite scores to plot"

    shown = selection.slice(0, max_images).to_pylist()
    pool_uri = pool or (summary.get("pool") or {}).get("uri")
    resolved = resolve_pool(pool_uri, run.storage_options) if pool_uri and shown else None
    names = resolved.classes if resolved is not None else None
    if resolved is not None:
        images, missing = _read_images(resolved, {row["key"]: row.get("shard") for row in shown})
    else:
        images, missing = {}, {row["key"]: "the run records no pool; pass --pool" for row in shown}
    thumbnails = [
        Thumbnail(
            int(row["rank"]),
            row["key"],
            _finite(row.get("score")),
            row.get("pred_class"),
            names[row["pred_class"]]
            if names and row.get("pred_class") is not None and 0 <= row["pred_class"] < len(names)
            else None,
            _finite(row.get("pred_prob")),
            images.get(row["key"]),
            missing.get(row["key"], ""),
        )
        for row in shown
    ]
    errors = load_errors(run.uri, run.storage_options)
    return RunReport(
        summary=summary,
        thumbnails=thumbnails,
        selected=len(selection),
        max_images=max_images,
        histogram=histogram,
        histogram_note=note,
        class_mix=_class_mix(
            selection.column("pred_class").to_pylist() if "pred_class" in selection.column_names else [],
            pool_classes,
            names,
        ),
        errors=errors.slice(0, max_errors).to_pylist(),
        errors_total=errors.num_rows,
        pool_rows=pool_rows,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Selection {{ s.run_id }}</title>
<style>{{ css }}</style></head><body>
<h1>Selection {{ s.run_id }}</h1>
<div class="muted"><code>{{ s.run_uri }}</code> &middot; committed {{ s.finished_at }} &middot; report generated {{ r.generated_at }}</div>

<h2>Inputs</h2>
<table>
<tr><th>strategy</th><td>{{ s.strategy }} {% for k, v in s.strategy_params.items() if v is not none %}<span class="muted">{{ k }}={{ v }}</span> {% endfor %}</td></tr>
<tr><th>k</th><td>{{ s.k }} <span class="muted">(selected {{ r.selected }})</span></td></tr>
<tr><th>pool</th><td><code>{{ s.pool.uri }}</code> <span class="muted">{{ s.pool.shards }} shards{% if s.pool.samples is not none %}, {{ "{:,}".format(s.pool.samples) }} samples{% endif %}</span></td></tr>
<tr><th>checkpoint</th><td><code>{{ (s.checkpoint or {}).uri }}</code><br><span class="muted">sha256</span> <code>{{ (s.checkpoint or {}).sha256 }}</code></td></tr>
{% if s.features %}<tr><th>proxy features</th><td><code>{{ s.features.store }}</code></td></tr>{% endif %}
<tr><th>exclusions</th><td>{{ (s.exclusions or {}).num_keys or 0 }} keys from {{ ((s.exclusions or {}).runs or [])|length }} run(s)</td></tr>
<tr><th>subset</th><td>{{ (s.subset or {}).size or "whole pool" }}</td></tr>
<tr><th>counts</th><td>{% for k, v in (s.counts or {}).items() %}{{ k }} {{ v }} &nbsp; {% endfor %}</td></tr>
<tr><th>time</th><td>{{ s.started_at }} &rarr; {{ s.finished_at }}{% if s.seconds is not none %} ({{ "%.0f"|format(s.seconds) }} s){% endif %}</td></tr>
<tr><th>fingerprint</th><td><code>{{ s.inputs_fingerprint }}</code></td></tr>
</table>

<h2>Scores: pool against selection</h2>
<p class="muted">{{ r.histogram_note }}</p>
{% if r.histogram %}<img class="plot" src="{{ r.histogram }}" alt="histogram of acquisition values">{% endif %}

<h2>Predicted classes: selection against pool</h2>
{% if r.class_mix %}
<table><tr><th>class</th><th class="num">selected</th><th></th><th class="num">pool</th><th></th></tr>
{% for c in r.class_mix %}
<tr><td>{{ c.label }}</td><td class="num">{{ c.selected }} ({{ "%.1f"|format(100 * c.selected_fraction) }}%)</td>
<td><span class="bar" style="width: {{ "%.0f"|format(200 * c.selected_fraction) }}px"></span></td>
<td class="num">{{ c.pool }} ({{ "%.1f"|format(100 * c.pool_fraction) }}%)</td>
<td><span class="bar pool" style="width: {{ "%.0f"|format(200 * c.pool_fraction) }}px"></span></td></tr>
{% endfor %}</table>
{% else %}<p class="muted">the run records no predicted classes</p>{% endif %}

<h2>Selected images, rank order</h2>
{% if r.thumbnails|length < r.selected %}
<p class="note">Showing ranks 1&ndash;{{ r.thumbnails|length }} of {{ r.selected }} selected (capped at {{ r.max_images }}).
The whole selection: <code>lplgrad manifest export {{ s.run_uri }} --format csv --out selection.csv</code>.</p>
{% endif %}
{% set missing = r.thumbnails|selectattr("src", "none")|list %}
{% if missing %}<p class="note">{{ missing|length }} selected image(s) could not be shown (reasons below each).</p>{% endif %}
<div class="grid">
{% for t in r.thumbnails %}
<div class="cell">
{% if t.src %}<img class="thumb" src="{{ t.src }}" alt="{{ t.key }}" title="{{ t.key }}">{% else %}<div class="missing" title="{{ t.missing }}">{{ t.missing }}</div>{% endif %}
<div><b>#{{ t.rank }}</b> {{ "%.4g"|format(t.score) if t.score is not none else "-" }}</div>
<div>{% if t.pred_class is not none %}class {{ t.class_name or t.pred_class }}{% if t.pred_prob is not none %} ({{ "%.2f"|format(t.pred_prob) }}){% endif %}{% else %}&nbsp;{% endif %}</div>
<div class="key" title="{{ t.key }}">{{ t.key }}</div>
</div>
{% endfor %}
</div>

<h2>Errors ({{ r.errors_total }})</h2>
{% if r.errors %}
{% if r.errors|length < r.errors_total %}<p class="note">Showing {{ r.errors|length }} of {{ r.errors_total }}; all are in errors.parquet.</p>{% endif %}
<table><tr><th>key</th><th>shard</th><th>reason</th></tr>
{% for e in r.errors %}<tr><td><code>{{ e.key if e.key is not none else "(whole shard)" }}</code></td><td><code>{{ e.shard }}</code></td><td>{{ e.reason }}</td></tr>
{% endfor %}</table>
{% else %}<p class="muted">none</p>{% endif %}
</body></html>
"""


def render_run_report(report: RunReport) -> str:
    """The page as HTML text (self-contained: no request leaves it)."""
    return render(_TEMPLATE, r=report, s=report.summary)


def write_run_report(
    uri: str,
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    max_images: int = MAX_IMAGES,
    pool: str | None = None,
) -> RunReport:
    """Build and write the report of the committed run at `uri` to `out` (a path or fsspec URI).

    Args:
        uri: Run directory, or an output root (follows LATEST).
        out: Where the HTML goes; written whole or not at all.
        storage_options: fsspec options for the run, its pool and `out`.
        max_images: Thumbnails shown, rank order.
        pool: The pool's current location, when it moved since the run.

    Returns:
        What the page shows.

    Raises:
        ManifestError, FileNotFoundError: As `open_run`. PoolError: The pool cannot be resolved.
    """
    run = open_run(uri, storage_options)
    report = build_run_report(run, max_images=max_images, pool=pool)
    fs, path = filesystem_for(out, storage_options)
    write_bytes_atomic(fs, path, render_run_report(report).encode("utf-8"))
    return report
