"""Local paths versus hub ids, for every config value that names a model (``model.path``, reward ``args``).

A value is taken as a local path when it starts with ``.``, ``/`` or ``~``, contains a backslash or the OS's
separator other than ``/``, has more than one ``/`` (a hub id is ``name`` or ``org/name``), exists, or its first
``/``-separated part is an existing local folder (``models/sd35m`` next to a ``models/`` folder). ``~`` is expanded.
A local path that does not exist raises ValueError naming the config key at once, without any network access,
instead of being sent to the hub as an id.
"""
from __future__ import annotations

import os
from pathlib import Path


def looks_local(value: str) -> bool:
    """Whether ``value`` reads as a local path rather than a hub id (see the module doc)."""
    if value.startswith((".", "/", "~")) or "\\" in value or (os.sep != "/" and os.sep in value):
        return True
    if value.count("/") > 1 or Path(value).exists():
        return True
    first = value.split("/", 1)[0]
    return "/" in value and Path(first).is_dir()


def model_location(key: str, value: str, *, kind: str = "folder") -> str:
    """``value`` with ``~`` expanded when it is a local path (ValueError naming ``key`` when that path does not
    exist), else unchanged (a hub id)."""
    if not looks_local(value):
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"{key} {value!r} does not exist"
                         + (f" ({path})" if str(path) != value else "")
                         + f": it reads as a local path; give an existing {kind} or a hub id ('org/name')")
    return str(path)
