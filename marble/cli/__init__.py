"""marble's command line: a thin layer that parses, validates through the library, and calls it.

Each command group lives in its own module and registers itself on `app`.
"""
from __future__ import annotations

from marble.threads import quiet_spin

quiet_spin()   # before anything imports torch: libgomp reads its wait policy once, at load

from marble.cli.app import app  # noqa: E402

# Command modules register themselves on import.
from marble.cli import generate as _generate  # noqa: F401,E402
from marble.cli import eval as _eval  # noqa: F401,E402
from marble.cli import dataset as _dataset  # noqa: F401,E402
from marble.cli import train as _train  # noqa: F401,E402
from marble.cli import serve as _serve  # noqa: F401,E402
from marble.cli import convert as _convert  # noqa: F401,E402
from marble.cli import bench as _bench  # noqa: F401,E402


def main() -> None:
    app()
