"""Local paths versus hub ids, for every config value that names a model (``model.path``, reward ``args``).

A value is taken as a local path when it starts with ``.``, ``/`` or ``~``, contains a backslash or the OS's
separator other than ``/``, has more than one ``/`` (a hub id is ``name`` or ``org/name``), exists, or its first
``/``-separated part is an existing local folder (``models/sd35m`` next to a ``models/`` folder). ``~`` is expanded.
A local path that does not exist raises ValueError naming the config key at once, without any network access,
instead of being sent to the hub as an id.

`check_model_source` also checks a hub id before anything loads (`fastgrpo.train.loop` runs it on ``model.path``
and every reward model): an id in the local Hugging Face cache passes without network access; offline
(``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``) any other id is a ValueError naming the key at once; online,
one metadata request with a short timeout (``HF_HUB_ETAG_TIMEOUT``, default 10 s) and no retries tells whether the
id exists, instead of transformers / diffusers retrying an unreachable hub for minutes before a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path


def looks_local(value: str) -> bool:
    """Whether ``value`` reads as a local path rather than a hub id (see the module doc); a URL is neither."""
    if "://" in value:
        return False
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


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether Hugging Face's offline mode is on: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as the environment
    says now, else huggingface_hub's constant (read when it was imported)."""
    env = [os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k) is not None]
    if env:
        return any(_true(v) for v in env)
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


def check_model_source(key: str, value: str, *, kind: str = "folder") -> str:
    """Where ``value`` (the config key ``key``) loads from, checked before loading: a local path must exist
    (`model_location`); a hub id must be in the local Hugging Face cache, or, online, exist on the hub (one request,
    ``HF_HUB_ETAG_TIMEOUT`` seconds at most, no retries). Anything else is a one-line ValueError naming ``key``."""
    where = model_location(key, value, kind=kind)
    if looks_local(value):
        return where
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = hub_cache_dir()
    try:
        snapshot_download(value, local_files_only=True, cache_dir=cache)
        return value
    except HFValidationError:
        raise ValueError(f"{key} {value!r} is neither an existing local path nor a hub id ('org/name')") from None
    except Exception:  # LocalEntryNotFoundError and kin: not (wholly) in the cache
        pass
    fetch = f"download it where the hub is reachable (`hf download {value}`, cache {cache}) or give a local {kind}"
    if hub_offline():
        raise ValueError(f"{key} {value!r} is not in the local Hugging Face cache and the hub is offline "
                         f"(HF_HUB_OFFLINE=1): {fetch}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    timeout = _hub_timeout()
    try:
        HfApi().model_info(value, timeout=timeout)
    except RepositoryNotFoundError:
        raise ValueError(f"{key} {value!r}: no such model on the Hugging Face hub (or it is private or gated: "
                         "log in with `hf auth login`)") from None
    except Exception as e:  # no network, DNS, timeout, proxy, hub down
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(f"{key} {value!r} is not in the local Hugging Face cache and the hub cannot be reached "
                         f"({type(e).__name__}{': ' + reason if reason else ''}; timeout {timeout:g} s, "
                         f"HF_HUB_ETAG_TIMEOUT): {fetch}; with HF_HUB_OFFLINE=1 fastgrpo never asks the hub") from None
    return value
