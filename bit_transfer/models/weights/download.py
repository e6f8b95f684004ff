"""Resolve `model.weights` to a local file: official BiT .npz URLs, hf: repos, URLs, paths.

Downloads go to `$BIT_TRANSFER_HOME/weights` (default ~/.cache/bit-transfer), through a
`.part` file that is resumed with an HTTP Range request and renamed only when complete,
under a lock so that several workers of one run download once.
"""

from __future__ import annotations

import fcntl
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from bit_transfer.system import hub
from bit_transfer import settings
from bit_transfer.errors import WeightsError
from bit_transfer.system import files

OFFICIAL_URL = "https://storage.googleapis.com/bit_models/{}.npz"
# Published files: BiT-{S,M}-<arch>.npz and the ImageNet fine-tuned BiT-M-<arch>-ILSVRC2012.npz.
OFFICIAL_NAME = re.compile(r"BiT-([SM])-R(50x1|50x3|101x1|101x3|152x2|152x4)(-ILSVRC2012)?", re.IGNORECASE)
CHUNK = 1 << 20


def cache_home(cache_dir=None) -> Path:
    """Where weights are cached: cache_dir, else bit_transfer.settings.home()."""
    return Path(cache_dir).expanduser() if cache_dir else settings.home()


def is_remote(spec: str) -> bool:
    """True for specs that name something to fetch rather than a local path."""
    s = spec.strip()
    return s.lower() == "auto" or s.startswith(("hf:", "http://", "https://")) or bool(OFFICIAL_NAME.fullmatch(s))


def official_name(model_name: str) -> str:
    m = OFFICIAL_NAME.fullmatch(str(model_name))
    if not m:
        raise WeightsError(
            f"model.weights 'auto' has no published weights for {model_name!r}; "
            "use a BiT-S-/BiT-M- registry model, a local file, 'hf:org/name', or 'none'"
        )
    kind, arch, tail = m.groups()
    return f"BiT-{kind.upper()}-R{arch.lower()}{'-ILSVRC2012' if tail else ''}"


RECIPE_KEY = "model.weights"  # where a recipe names its weights; commands that take a MODEL say "MODEL"


def use_instead(what: str, given_as: str = RECIPE_KEY) -> str:
    """The fix naming where the user gives weights: 'set model.weights to X' in a recipe, 'pass X as MODEL'
    for predict and export."""
    return f"set {given_as} to {what}" if given_as == RECIPE_KEY else f"pass {what} as {given_as}"


def resolve_weights(spec, model_name: str, cache_dir=None, given_as: str = RECIPE_KEY) -> Path:
    """spec: 'auto' (official .npz for model_name), an official file name like
    'BiT-M-R50x1-ILSVRC2012', 'hf:org/name[@revision]', an http(s) URL, or a local path.
    `given_as` is where the user wrote it (model.weights, or MODEL), for the fixes errors name."""
    spec = str(spec).strip()
    home = cache_home(cache_dir)
    if spec.lower() == "auto" or OFFICIAL_NAME.fullmatch(spec):
        name = official_name(model_name if spec.lower() == "auto" else spec)
        return download(OFFICIAL_URL.format(name), home / "weights" / f"{name}.npz", given_as=given_as)
    if spec.startswith("hf:"):
        return _hf_snapshot(spec[3:], home / "hf", given_as)
    if spec.startswith(("http://", "https://")):
        filename = Path(urllib.parse.unquote(urllib.parse.urlparse(spec).path)).name or "weights"
        return download(spec, home / "weights" / filename, given_as=given_as)
    path = Path(spec).expanduser()
    if not path.exists():
        fix = use_instead("an existing file, 'auto', 'hf:org/name' or 'none'", given_as)
        raise WeightsError(f"weights {path} not found; {fix}")
    return path


def download(url: str, dest: Path, timeout: float = 30.0, given_as: str = RECIPE_KEY) -> Path:
    """Fetch url to dest (kept as a cache: an existing dest is returned as is)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.is_file():
            _fetch(url, dest, timeout, given_as)
    return dest


def _offline(url: str, dest: Path, why: str, given_as: str = RECIPE_KEY) -> WeightsError:
    return WeightsError(
        f"cannot download {url} ({why}); download it on a machine with internet access and put it at {dest}, "
        f"or {use_instead('a local file', given_as)}"
    )


def _fetch(url: str, dest: Path, timeout: float, given_as: str = RECIPE_KEY) -> None:
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "bit-transfer"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is not a prefix of this file: start over
            part.unlink()
            return _fetch(url, dest, timeout, given_as)
        if e.code == 404:
            raise WeightsError(f"{url} does not exist (HTTP 404); check the model name or URL") from None
        raise _offline(url, dest, f"HTTP {e.code}", given_as) from None
    except (urllib.error.URLError, OSError) as e:
        raise _offline(url, dest, str(getattr(e, "reason", e)), given_as) from None
    with resp:
        if offset and resp.status != 206:  # server ignored the Range: restart
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done = offset
        try:
            with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=None
            ) as bar:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise WeightsError(
                f"download of {url} broke off after {done} bytes ({e}); run again to resume from {part}"
            ) from None
    if total is not None and done != total:
        raise WeightsError(f"download of {url} stopped at {done} of {total} bytes; run again to resume from {part}")
    files.publish(part, dest)


# huggingface_hub error classes (matched by name: their modules moved between versions)
_HF_REASONS = {
    "LocalEntryNotFoundError": "offline and not in the cache",
    "OfflineModeIsEnabled": "HF_HUB_OFFLINE is set and it is not in the cache",
    "RepositoryNotFoundError": "no such repository, or it is private",
    "GatedRepoError": "the repository is gated: log in with `hf auth login`",
    "RevisionNotFoundError": "no such revision",
    "EntryNotFoundError": "the repository has no such file",
    "RemoteEntryNotFoundError": "the repository has no such file",
}


def _hf_snapshot(repo: str, cache: Path, given_as: str = RECIPE_KEY) -> Path:
    """config.json + model.safetensors (+ preprocessor_config.json when there is one) of a Hugging Face
    repo, via huggingface_hub's cache."""
    repo, _, revision = repo.partition("@")
    hint = (
        f"put config.json and model.safetensors from https://huggingface.co/{repo} into a directory "
        f"and {use_instead('that directory' if given_as != RECIPE_KEY else 'it', given_as)}"
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError(f"hf: weights need huggingface_hub (pip install huggingface_hub), or {hint}") from None
    offline = hub.offline()  # no network: read the cache at once instead of ~25 s of retries
    path = None
    for filename in ("config.json", "model.safetensors"):
        try:
            path = hf_hub_download(repo, filename, revision=revision or None, cache_dir=str(cache))
        except Exception as e:  # offline, missing repo/file, auth: all end the same way for the user
            why = _HF_REASONS.get(type(e).__name__, type(e).__name__)
            if offline and type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
                why = f"not in the cache {cache} and {hub.why_offline()}"
            raise WeightsError(f"cannot fetch {filename} of hf:{repo} ({why}); {hint}") from None
    try:  # optional: the resolution the model expects, for export and predict; many repos have none
        hf_hub_download(repo, "preprocessor_config.json", revision=revision or None, cache_dir=str(cache))
    except Exception:
        pass
    return Path(path).parent
