"""The "image" every container runs: this host's filesystem with this Python environment on PATH.

Images are not pulled or unpacked here: a container's root is an overlay over the host's ``/``, and
its environment starts from what the image would set (PATH, with this virtualenv's ``bin`` first).
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

IMAGE_PATH = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_env() -> dict[str, str]:
    """What the image's ENV would give every container (the pod's own variables override it)."""
    return {"PATH": IMAGE_PATH}


@cache
def python_paths() -> list[str]:
    """Host paths (symlinks resolved) the container's user must reach to run this Python and its packages.

    The interpreter and the shared packages may sit under a home directory only root can enter
    (/root is 0700); the sandbox opens them up inside the container's root only.
    """
    search = list(sys.path)
    if search and search[0] in ("", os.getcwd()):
        search = search[1:]  # `python -m`/`-c` put the working directory first: that is no part of the image
    paths = {sys.executable, sys.prefix, sys.base_prefix, *search}
    resolved = {os.path.realpath(p) for p in paths if p and os.path.exists(p)}
    return sorted(resolved)
