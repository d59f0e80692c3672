"""The offline corpus: the Python standard library's own source code, as JSON lines.

Every machine that runs Agora has a Python 3.11 standard library, so its ``*.py`` files are real,
human-written text (code, docstrings, comments) available without any download. That makes a
corpus good enough for tests, demos and smoke-training runs, where a Hub dataset is unavailable.

The corpus is written once per cache directory as ``stdlib-corpus-{train,validation}.jsonl`` (one
``{"text", "path"}`` record per source file) plus a manifest written last; later calls reuse the
files while the manifest still matches them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "AGORA_CACHE_DIR"
CORPUS_SPLITS = ("train", "validation")

# Bump when the record format or file selection changes, so stale caches get rebuilt.
_FORMAT_VERSION = 1
_MANIFEST_NAME = "stdlib-corpus-manifest.json"
_MAX_FILE_BYTES = 512 * 1024
# Tests are not representative prose and partly duplicate the code they test; site-packages is
# third-party and differs between machines.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def default_cache_dir() -> Path:
    """``$AGORA_CACHE_DIR`` if set, otherwise ``~/.cache/agora``."""
    from_env = os.environ.get(CACHE_DIR_ENV)
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "agora"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The directory to use: an explicit one wins over the environment and the default."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def corpus_path(cache_dir: Path, split: str) -> Path:
    """Location of one split's JSON-lines file inside ``cache_dir``."""
    return cache_dir / f"stdlib-corpus-{split}.jsonl"


def hash_fraction(key: str) -> float:
    """Map ``key`` to [0, 1) with a hash that is stable across processes and Python versions.

    The built-in ``hash`` is salted per process, so it cannot decide a split that must never change.
    """
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation_key(key: str, validation_fraction: float) -> bool:
    """Whether the document identified by ``key`` belongs to the validation split."""
    return hash_fraction(key) < validation_fraction


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_sources(root: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative posix path, absolute path)`` of every eligible source file, sorted by relative path.

    Sorting makes the corpus order independent of the file system's directory order.
    """
    root = root or stdlib_root()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of site-packages, which can hold many thousands of files.
        dirnames[:] = [name for name in dirnames if name not in _SKIPPED_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and path.is_file() and path.stat().st_size <= _MAX_FILE_BYTES:
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def iter_records(sources: Iterable[tuple[str, Path]]) -> Iterator[dict[str, str]]:
    """One ``{"text", "path"}`` record per non-empty source file."""
    for relpath, path in sources:
        text = path.read_text(encoding="utf-8", errors="replace")
        # Empty files (mostly bare __init__.py) would only add end-of-text tokens to the stream.
        if text.strip():
            yield {"text": text, "path": relpath}


def ensure_local_corpus(cache_dir: Path | None = None, validation_fraction: float = 0.02) -> dict[str, Path]:
    """Build the stdlib corpus in ``cache_dir`` unless a complete, matching one is already there.

    Returns ``{"train": path, "validation": path}``. Safe to call from several processes at once:
    each writes its own temporary files and atomically renames identical content into place.
    A cache built with another ``validation_fraction`` is rebuilt, so processes sharing one cache
    directory should agree on it.
    """
    if not 0.0 <= validation_fraction < 0.5:
        raise ValueError(f"validation_fraction must be in [0, 0.5), got {validation_fraction}")
    cache_dir = resolve_cache_dir(cache_dir)
    paths = {split: corpus_path(cache_dir, split) for split in CORPUS_SPLITS}
    if _cache_is_valid(cache_dir, paths, validation_fraction):
        return paths
    _build_corpus(cache_dir, paths, validation_fraction)
    return paths


def _expected_header(validation_fraction: float) -> dict[str, object]:
    return {
        "format_version": _FORMAT_VERSION,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "validation_fraction": validation_fraction,
    }


def _cache_is_valid(cache_dir: Path, paths: dict[str, Path], validation_fraction: float) -> bool:
    try:
        manifest = json.loads((cache_dir / _MANIFEST_NAME).read_text(encoding="utf-8"))
        header_matches = all(manifest.get(k) == v for k, v in _expected_header(validation_fraction).items())
        # Sizes catch truncated or hand-edited files without re-reading them.
        sizes_match = all(manifest["splits"][split]["bytes"] == path.stat().st_size for split, path in paths.items())
        return bool(header_matches and sizes_match)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_corpus(cache_dir: Path, paths: dict[str, Path], validation_fraction: float) -> None:
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Drop the manifest first: if this build dies halfway, the next call must not trust the files.
    (cache_dir / _MANIFEST_NAME).unlink(missing_ok=True)

    records = list(iter_records(iter_stdlib_sources()))
    if not records:
        raise RuntimeError(
            f"found no Python sources under {stdlib_root()}; the offline corpus needs the standard library's "
            "*.py files. Use a full Python installation or set data.source to 'hub'."
        )
    by_split: dict[str, list[dict[str, str]]] = {split: [] for split in CORPUS_SPLITS}
    for record in records:
        split = "validation" if is_validation_key(record["path"], validation_fraction) else "train"
        by_split[split].append(record)

    splits_info = {}
    for split, path in paths.items():
        lines = (json.dumps(record, ensure_ascii=True) + "\n" for record in by_split[split])
        _atomic_write(path, lines)
        splits_info[split] = {"file": path.name, "records": len(by_split[split]), "bytes": path.stat().st_size}

    manifest = {**_expected_header(validation_fraction), "stdlib": str(stdlib_root()), "splits": splits_info}
    _atomic_write(cache_dir / _MANIFEST_NAME, [json.dumps(manifest, indent=2) + "\n"])
    logger.info(
        "Built the stdlib corpus in %s: %d train / %d validation documents in %.1f s",
        cache_dir,
        splits_info["train"]["records"],
        splits_info["validation"]["records"],
        time.perf_counter() - started,
    )


def _atomic_write(path: Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to ``path`` so that readers see either the old file or the complete new one."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates owner-only files; the cache holds nothing secret and may be shared.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as tmp:
            tmp.writelines(chunks)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
