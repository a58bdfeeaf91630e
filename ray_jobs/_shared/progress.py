"""What a job prints while it runs: quiet by default, Ray's own output back with `--verbose`.

    lplgrad quickstart                 # one progress display per phase, then the summary
    lplgrad quickstart --verbose       # plus Ray's INFO logs, Ray Data's progress, every worker's output
    LPLGRAD_VERBOSE=1 python -m ray_jobs.train ...   # the same for `python -m` and `ray job submit`

Quiet means: Ray logs WARNING and above on the driver; Ray Data prints neither its execution
plans nor its progress (both stay in the session's ray-data.log); worker output is not forwarded
(a failing task or actor still raises its traceback in the driver). A phase shows progress with
:class:`Progress`: in a terminal one bar redrawn in place with rate and ETA, elsewhere (CI, `ray job
submit` logs) one line per step. Training epochs reach the driver through :class:`EpochFeed`, a Ray
queue the rank-0 worker puts each epoch's metrics on, so they are printed once, by the driver.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

__all__ = [
    "EpochFeed",
    "PROGRESS_INTERVAL_ENV",
    "Progress",
    "VERBOSE_ENV",
    "progress_interval",
    "put_epoch",
    "quiet_ray",
    "ray_init_options",
    "verbose",
]

VERBOSE_ENV = "LPLGRAD_VERBOSE"
PROGRESS_INTERVAL_ENV = "LPLGRAD_PROGRESS_INTERVAL_S"  # seconds between a long phase's lines (default 10)


def progress_interval() -> float:
    """Seconds between the lines of a phase that prints while it waits (``LPLGRAD_PROGRESS_INTERVAL_S``, 10)."""
    return float(os.environ.get(PROGRESS_INTERVAL_ENV) or 10.0)


def verbose() -> bool:
    """Whether Ray's own output is wanted (`--verbose`, or LPLGRAD_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def ray_init_options() -> dict[str, Any]:
    """Extra `ray.init` arguments: none when verbose, else WARNING logs and no worker output."""
    return {} if verbose() else {"logging_level": logging.WARNING, "log_to_driver": False}


def quiet_ray() -> None:
    """After `ray.init`: Ray Data's plans and progress off the console (still in ray-data.log)."""
    if verbose():
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            # Console handlers only; the session's file handlers keep everything.
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
                handler.addFilter(_drop_progress_bar_notice)
        if not logging.getLogger(name).handlers:
            logging.getLogger(name).setLevel(logging.WARNING)


def _drop_progress_bar_notice(record: logging.LogRecord) -> bool:
    # Ray Data warns that its bars are off, which is what quiet asked for; jobs show their own.
    return not str(record.msg).startswith("Progress bars disabled")


def _seconds(value: float) -> str:
    value = max(value, 0.0)
    if value < 90:
        return f"{value:.0f} s"
    return f"{value / 60:.1f} min" if value < 5400 else f"{value / 3600:.1f} h"


class Progress:
    """Progress of one phase: `update()` per step; `close()` at the end.

    In a terminal: one line redrawn in place, `phase [#####.....] done/total unit  rate  ETA`.
    Elsewhere: one line per `update()` call (the caller decides what a step is), no control
    characters. `min_interval` thins the lines of fast, many-step phases (0: every step).

    With `heartbeat_s`, a thread also prints the line whenever none was printed for that long, from
    `__enter__` on, so a phase that waits (actors starting, a first batch in flight) is never silent;
    `stage()` names what it is doing now ("starting actors", "scoring"). The rate is over the last
    `window_s` seconds: it falls when the work stalls. One printer serves a job's lines: `note()`
    (e.g. the waiting line of `capacity.watch_pending`) and `echo()` print between its lines.

    Args:
        phase: Short name printed first ("score", "train cycle-0").
        total: Steps expected, None when unknown (no bar, no ETA).
        unit: What a step counts ("rows", "epochs").
        stream: Where to print (stdout).
        tty: Force terminal or line mode (default: `stream.isatty()`).
        min_interval: Seconds between lines in line mode (the last step always prints).
        heartbeat_s: Print the line at least this often (None: only on `update()`).
        window_s: The rate is over this many recent seconds.
    """

    def __init__(
        self,
        phase: str,
        total: int | None,
        unit: str,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        min_interval: float = 0.0,
        heartbeat_s: float | None = None,
        window_s: float = 30.0,
    ) -> None:
        self.phase, self.total, self.unit = phase, total, unit
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_interval = min_interval
        self.heartbeat_s, self.window_s = heartbeat_s, window_s
        self.done = 0
        self.start = time.perf_counter()
        self.current_stage = ""
        self.lines = 0  # status lines printed (line mode) or drawn (terminal)
        self._last_line = -float("inf")
        self._printed = 0
        self._note = ""
        self._recent: deque[tuple[float, int]] = deque()  # (time, done) of the steps in the window
        self._steps = 0
        self._width = 0
        self._lock = threading.RLock()  # the heartbeat thread and the caller print through one stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rate(self, now: float | None = None) -> float | None:
        """Steps per second over the last `window_s` (0 when stalled that long; None before the
        second step: the pace is unknown).

        The window starts at the first step: start-up (workers, actors, the first batch) is not a step's pace.
        """
        now = time.perf_counter() if now is None else now
        recent = self._recent
        while len(recent) > 1 and recent[1][0] <= now - self.window_s:
            recent.popleft()  # keep one step at or before the window's start as its base
        if self._steps < 2:
            return None
        base_at, base_done = recent[0]
        return (self.done - base_done) / (now - base_at) if now > base_at else None

    def _status(self, note: str) -> str:
        now = time.perf_counter()
        elapsed = now - self.start
        rate = self.rate(now)
        count = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        parts = ([self.current_stage] if self.current_stage else []) + [f"{count} {self.unit}"]
        if rate is not None:
            parts.append(f"{rate:,.1f} {self.unit}/s" if rate < 100 else f"{rate:,.0f} {self.unit}/s")
        if self.total and self.done >= self.total:
            parts.append(f"in {_seconds(elapsed)}")
        elif self.total and rate:
            parts.append(f"ETA {_seconds((self.total - self.done) / rate)}")
        if self.heartbeat_s is not None and not (self.total and self.done >= self.total):
            parts.append(f"{_seconds(elapsed)} in")
        return "  ".join(parts + ([note] if note else []))

    def update(self, steps: int = 1, note: str = "", *, paced: bool = True) -> None:
        """Count `steps` more done; `note` is appended to the line (an epoch's loss, say).
        `paced=False` counts steps that took no work (rows skipped): the rate ignores them."""
        with self._lock:
            self.done += steps
            now = time.perf_counter()
            if not paced:
                self._recent = deque((at, done + steps) for at, done in self._recent)
            self._recent.append((now, self.done))
            self._steps += 1
            self._note = note
            due = now - self._last_line >= self.min_interval or (self.total and self.done >= self.total)
            if self.tty or due:
                self._draw(now, note)

    def _draw(self, now: float, note: str) -> None:
        if self.tty:
            bar = ""
            if self.total:
                filled = int(24 * min(self.done / self.total, 1.0))
                bar = f"[{'#' * filled}{'.' * (24 - filled)}] "
            line = f"{self.phase} {bar}{self._status(note)}"
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(f"{self.phase}: {self._status(note)}\n")
        self._last_line, self._printed = now, self.done
        self.lines += 1
        self.stream.flush()

    def stage(self, name: str) -> None:
        """What the phase is doing now; a change is shown at once (the line, with its new stage)."""
        with self._lock:
            if name != self.current_stage:
                self.current_stage = name
                self._draw(time.perf_counter(), "")

    def note(self, text: str) -> None:
        """A line of its own, `phase: text`, between steps (a waiting line, a warning). On a
        terminal it starts on a new line, below any bar drawn in place there."""
        self.echo(f"{self.phase}: {text}")

    def echo(self, text: str) -> None:
        """`text` as a line of its own, between this printer's lines (below a bar drawn in place)."""
        with self._lock:
            lead = "\n" if self._width or (self.stream.isatty() and not self.tty) else ""
            self._width = 0
            self.stream.write(f"{lead}{text}\n")
            self.stream.flush()

    def _beat(self) -> None:
        assert self.heartbeat_s is not None
        while not self._stop.wait(min(self.heartbeat_s, 1.0)):
            with self._lock:
                now = time.perf_counter()
                if now - self._last_line >= self.heartbeat_s:
                    self._draw(now, self._note)

    def close(self) -> None:
        """End the bar's line (terminal mode); in line mode, print the last step if it was thinned out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self.tty and self._width:
                self.stream.write("\n")
                self._width = 0
            elif not self.tty and self.done and self._printed < self.done:
                self.stream.write(f"{self.phase}: {self._status('')}\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        if self.heartbeat_s is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"lplgrad-{self.phase}-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EpochFeed:
    """Training epochs as a phase: workers put metrics on a Ray queue, the driver shows them.

    `queue` goes into the train loop's config (None when verbose: workers print as before);
    the rank-0 worker calls :func:`put_epoch`. A driver thread turns each epoch into a
    `Progress` step with its loss and accuracies, so every epoch is printed once.
    """

    def __init__(
        self, phase: str, epochs: int, format_metrics: Callable[[Mapping[str, Any]], str] | None = None
    ) -> None:
        self.progress = Progress(phase, epochs, "epochs")
        self.format = format_metrics or _epoch_note
        self.queue: Any = None
        if not verbose():
            from ray.util.queue import Queue

            self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EpochFeed:
        if self.queue is not None:
            self._thread = threading.Thread(target=self._drain, name="lplgrad-epochs", daemon=True)
            self._thread.start()
        return self

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                metrics = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (job shutting down): nothing more to show
                return
            self.progress.update(1, self.format(metrics))

    def __exit__(self, *exc: object) -> None:
        if self.queue is None:
            return
        time.sleep(0.2)  # the last epoch's put precedes the trainer's return; let the thread take it
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            while not self.queue.empty():
                self.progress.update(1, self.format(self.queue.get_nowait()))
        except Exception:  # the queue actor is gone already
            pass
        self.progress.close()
        self.queue.shutdown()


def put_epoch(queue: Any, metrics: Mapping[str, Any]) -> bool:
    """On the rank-0 worker: hand an epoch's metrics to the driver; False when there is no feed."""
    if queue is None:
        return False
    queue.put(dict(metrics))
    return True


def _epoch_note(metrics: Mapping[str, Any]) -> str:
    parts = [f"epoch {metrics.get('epoch')}"]
    for name, label in (("loss", "loss"), ("train_accuracy", "train acc"), ("holdout_accuracy", "holdout acc")):
        value = metrics.get(name)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.3f}")
    return "  ".join(parts)
