"""The Ray jobs and the `lplgrad` command (see README.md).

Under `ray job submit`, the entrypoint's `python` is whichever one the head's PATH finds; when it
is not the environment lplgrad was installed in, the first heavy import fails deep inside a job
module. Checked here instead, so the one line says which interpreter ran and what to do.
"""

from __future__ import annotations

import importlib.util
import sys

_NEEDED = ("ray", "torch", "pyarrow", "webdataset", "fsspec", "yaml")

if _missing := [name for name in _NEEDED if importlib.util.find_spec(name) is None]:
    print(
        f"lplgrad: error: {sys.executable} has no {', '.join(_missing)}: it is not the environment lplgrad is "
        "installed in (install it there with `pip install -e .`, or run the interpreter that has it; under "
        "`ray job submit` the entrypoint's `python` is the one on the PATH of the `ray start` that started the "
        "head: start the head from lplgrad's environment, see docs/cluster.md)",
        file=sys.stderr,
    )
    raise SystemExit(2)
