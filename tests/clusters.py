"""The cluster versions the project builds environments for (Makefile: one pair of
environments per version): the default cluster's and the newer one's, each with the worker
extra that pins its Ray (pyproject.toml) and its Python minor version. Shared by both suites
(Python 3.9: no tomllib, so the pin is read as the Makefile reads it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Tuple

from tests.conftest import environment_python

ROOT = Path(__file__).resolve().parent.parent


class ClusterVersion(NamedTuple):
    """``suffix`` names its environments (``.venv-worker<suffix>``, ``.venv-cluster<suffix>``)."""

    suffix: str
    extra: str
    python: Tuple[int, int]

    @property
    def ray(self) -> str:
        """The Ray release the extra pins."""
        text = (ROOT / "pyproject.toml").read_text()
        block = re.search(rf"^{re.escape(self.extra)} = \[(.*?)^\]", text, re.S | re.M)
        pin = block and re.search(r'"ray\[client\]==([0-9.]+)"', block.group(1))
        assert pin, f"pyproject.toml's {self.extra} extra pins ray[client]"
        return pin.group(1)

    @property
    def minor(self) -> str:
        """The Python minor version, as Ray client compares it: ``3.9``."""
        return f"{self.python[0]}.{self.python[1]}"

    def worker_python(self) -> str:
        return environment_python("worker" + self.suffix)

    def cluster_python(self) -> str:
        return environment_python("cluster" + self.suffix)

    def __str__(self) -> str:
        return f"Python {self.minor} / {self.extra}"


DEFAULT = ClusterVersion("", "worker", (3, 9))
# The newer cluster our upstream users also run (issue 19).
NEXT = ClusterVersion("-next", "worker-next", (3, 13))
VERSIONS = (DEFAULT, NEXT)
