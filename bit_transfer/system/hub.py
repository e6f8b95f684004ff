"""Is the Hugging Face hub reachable? Asked once per process, in about 2 s, before the first hub call.

Without network, huggingface_hub and datasets retry every request with back-off: ~25 s and a
dozen log lines before they fail. When the hub's host cannot be reached we switch them to
offline mode (HF_HUB_OFFLINE=1) for this process instead: what is cached still loads, what is
not fails at once, and the caller says what to download where. Only the hub host (HF_ENDPOINT)
is contacted; behind a proxy the proxy decides, so nothing is checked.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT = 2.0  # seconds for name resolution and TCP connect together
_TRUE = {"1", "ON", "YES", "TRUE"}
_switched = []  # non-empty once `offline()` turned offline mode on because the hub was unreachable


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def host() -> str:
    return urllib.parse.urlsplit(endpoint()).hostname or endpoint()


def offline_requested() -> bool:
    """The user (or an earlier check) asked for offline mode."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(n, "").upper() in _TRUE for n in names):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


@functools.lru_cache(maxsize=None)
def reachable(url: str) -> bool:
    """A TCP connection to url's host within TIMEOUT, name lookup included (it can hang: a thread)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return True
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return True  # only the proxy knows; let huggingface_hub ask it
    port = parts.port or (443 if parts.scheme == "https" else 80)
    ok = []

    def connect():
        try:
            socket.create_connection((parts.hostname, port), timeout=TIMEOUT).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(TIMEOUT + 0.5)
    return bool(ok)


def offline() -> bool:
    """True when the hub must not be asked: offline mode was requested, or the hub is unreachable,
    in which case HF_HUB_OFFLINE=1 is set for this process (and the libraries already imported)."""
    if offline_requested():
        return True
    if reachable(endpoint()):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    _switched.append(host())
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    return True


def why_offline() -> str:
    """For messages: why the hub was not asked."""
    if _switched:
        return f"{_switched[0]} cannot be reached, so it ran with HF_HUB_OFFLINE=1"
    return "HF_HUB_OFFLINE=1 is set"
