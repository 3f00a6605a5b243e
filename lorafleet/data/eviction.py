"""Listing and evicting tokenized caches (`lorafleet data cache list|prune`): those of a storage
(`<storage>/_cache/tokenized/<key>/`, [`~lorafleet.data.cache.build_cache`]) and this machine's copies of
object-store caches ([`~lorafleet.data.cache.mirror_root`], `--local`).

What a cache folder tells, from one recursive listing and one read of each `index.json`:

- complete: it has its `index.json` (written last). Created: that file's time.
- last used: the time of its `last_used.json`, rewritten by a job that builds or finds the cache (at most every
  [`~lorafleet.data.cache.USE_RECORD_EVERY_S`]), else its creation. A mirror records every open on its machine.
- incomplete: no `index.json` (a build uploading its shards; a local build's hidden `.<key>-*` staging folder; an
  interrupted download). While its newest file is younger than [`BUILD_GRACE_S`] it is a build in progress and is
  never removed; older, it is abandoned, and every prune removes it.

Removing a cache deletes its `index.json` first, so that a job starting meanwhile finds no cache and builds it again
rather than finding half of one. A job already reading it on the same machine keeps reading: its shards are
memory-mapped, and a removed file stays readable while it is mapped. On another machine a job reads its own copy
(object stores: the mirror) and also keeps going, but a worker that starts there later (a restart after a failure)
finds the cache gone and fails; re-submitting builds it again. `--max-size` never evicts a cache used within
[`RECENT_USE_S`] (a job may be starting on it); `--older-than` and `--key` remove what they name.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from pyarrow import fs

from lorafleet.data.cache import CACHE_FOLDER, INDEX_FILE, LAST_USED_FILE, mirror_root
from lorafleet.runstore.location import filesystem_for, split_uri, storage_error_cause

# An incomplete cache folder whose newest file is younger than this is a build (or download) in progress. Shards are
# written (or uploaded) one after another, each within minutes even at 200k rows, so hours of silence mean it died.
BUILD_GRACE_S = 6 * 3600
# `--max-size` keeps caches used this recently: between a job's driver finding a cache and its workers opening it
# there are minutes (Ray start, model load), and USE_RECORD_EVERY_S may leave the record 10 minutes behind.
RECENT_USE_S = 3600

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


class CacheStoreError(Exception):
    """The caches' storage cannot be listed or changed (one line: where and why)."""


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `7d`, `12h`, `30m`, `90s`, `2w` or `1d12h` (a bare number is seconds).

    Raises:
        `ValueError`: Not a duration.

    Example:

    ```python
    >>> parse_duration("7d"), parse_duration("1d12h"), parse_duration("90")
    (604800.0, 129600.0, 90.0)
    ```
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw])", value)
    if not parts or re.sub(r"\s", "", value) != "".join(n + u for n, u in parts):
        raise ValueError(f"cannot read '{text}' as a duration (e.g. 7d, 12h, 30m)")
    return float(sum(float(n) * _DURATION_UNITS[u] for n, u in parts))


def parse_size(text: str) -> int:
    """Bytes in a size such as `20GB` (10^9), `20GiB` or `20G` (2^30, as `du` and `df` count), `500MB`, `1.5TB`, or a
    bare number of bytes.

    Raises:
        `ValueError`: Not a size.

    Example:

    ```python
    >>> parse_size("20GB"), parse_size("1.5GiB"), parse_size("4096")
    (20000000000, 1610612736, 4096)
    ```
    """
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"cannot read '{text}' as a size (e.g. 20GB, 500MB, 1.5TiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_size(size: int) -> str:
    """A byte count for people, in powers of 1000 (`12.3 MB`), as `--max-size 20GB` reads it.

    Example:

    ```python
    >>> format_size(0), format_size(12_345_678), format_size(20 * 10**9)
    ('0 B', '12.3 MB', '20.0 GB')
    ```
    """
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_age(seconds: Optional[float]) -> str:
    """An age for people: `45s`, `12m`, `5h`, `3d`, or `-` when unknown.

    Example:

    ```python
    >>> format_age(30), format_age(7200), format_age(3 * 86400 + 5), format_age(None)
    ('30s', '2h', '3d', '-')
    ```
    """
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


@dataclass(frozen=True)
class CacheStore:
    """A folder of tokenized caches: a storage's `<storage>/_cache/tokenized` ([`CacheStore.of_storage`]) or this
    machine's copies of object-store caches ([`CacheStore.local`]).

    Args:
        scheme (`str`): `""` (local), `s3` or `gs`.
        folder (`str`): The folder on that filesystem (no scheme).
        endpoint (`str`, *optional*): `checkpoint.endpoint`.

    Example:

    ```python
    >>> CacheStore.of_storage("s3://bucket/runs").uri
    's3://bucket/runs/_cache/tokenized'
    ```
    """

    scheme: str
    folder: str
    endpoint: Optional[str] = None

    @classmethod
    def of_storage(cls, storage: str, endpoint: Optional[str] = None) -> CacheStore:
        """The caches of a `checkpoint.storage` (a local path, `file://`, `s3://...`, `gs://...`)."""
        scheme, root = split_uri(storage)
        return cls(scheme, f"{root.rstrip('/')}/{CACHE_FOLDER}", endpoint)

    @classmethod
    def local(cls) -> CacheStore:
        """This machine's copies of object-store caches ([`~lorafleet.data.cache.mirror_root`])."""
        return cls("", str(mirror_root()))

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.folder}" if self.scheme else self.folder

    def filesystem(self) -> fs.FileSystem:
        return filesystem_for(self.scheme, self.endpoint)


@dataclass
class CacheEntry:
    """One cache folder of a [`CacheStore`], as [`list_caches`] found it.

    Attributes:
        key (`str`): The cache key ([`~lorafleet.data.cache.cache_key`]).
        path (`str`): The folder on the store's filesystem (`.<key>-*` for a local build's staging folder).
        state (`str`): `complete`, `building` (incomplete, newest file younger than [`BUILD_GRACE_S`]) or
            `abandoned` (incomplete and older: garbage).
        size (`int`): Bytes of all its files.
        records (`int`, *optional*): Rows (valid records), from `index.json`.
        created (`float`, *optional*): When it was completed (its `index.json`), seconds since the epoch.
        last_used (`float`, *optional*): When a job last used it (its `last_used.json`, else `created`; for an
            incomplete folder, its newest file).
        source (`str`, *optional*): The `data.path` it was built from.
    """

    key: str
    path: str
    state: str
    size: int = 0
    records: Optional[int] = None
    created: Optional[float] = None
    last_used: Optional[float] = None
    source: Optional[str] = None

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def as_dict(self, store: Optional[CacheStore] = None) -> dict[str, Any]:
        """The entry as JSON: its fields, `complete`, `uri` with a store, and ISO 8601 UTC times."""
        out = asdict(self)
        out["complete"] = self.complete
        if store is not None:
            out["uri"] = f"{store.scheme}://{self.path}" if store.scheme else self.path
        for name in ("created", "last_used"):
            value = out[name]
            out[name] = None if value is None else datetime.fromtimestamp(value, timezone.utc).isoformat()
        return out


def list_caches(store: CacheStore, now: Optional[float] = None) -> list[CacheEntry]:
    """Every cache folder of `store`, complete or not, by key.

    Args:
        store ([`CacheStore`]): Where.
        now (`float`, *optional*): The time that decides `building` vs `abandoned`; default: now.

    Returns:
        `list[CacheEntry]`: Sorted by key; empty when the store has no cache folder yet.

    Raises:
        [`CacheStoreError`]: The storage cannot be listed (a missing bucket, refused credentials, no server there,
        a local path under a file).

    Example:

    ```python
    >>> import tempfile
    >>> list_caches(CacheStore.of_storage(tempfile.mkdtemp()))
    []
    ```
    """
    now = time.time() if now is None else now
    filesystem = _filesystem(store)
    try:
        if store.scheme:
            # A listing under a missing bucket is empty, not an error: ask for the bucket itself.
            bucket = store.folder.split("/", 1)[0]
            if filesystem.get_file_info(bucket).type == fs.FileType.NotFound:
                raise CacheStoreError(f"{store.scheme}://{bucket}: no such bucket")
        else:
            # Likewise under a file: a storage path that can hold no run is a mistake, not an empty storage.
            existing = next(p for p in (Path(store.folder), *Path(store.folder).parents) if p.exists())
            if not existing.is_dir():
                raise CacheStoreError(f"{store.uri}: cannot list ({existing} is a file)")
        infos = filesystem.get_file_info(fs.FileSelector(store.folder, recursive=True, allow_not_found=True))
    except (OSError, ValueError) as exc:
        raise CacheStoreError(f"{store.uri}: cannot list ({storage_error_cause(exc)})") from None
    folders: dict[str, list[fs.FileInfo]] = {}
    for info in infos:
        top = info.path[len(store.folder):].lstrip("/").split("/", 1)[0]
        if top:
            folders.setdefault(top, []).append(info)
    entries = [_entry(store, filesystem, name, infos, now) for name, infos in folders.items()]
    return sorted((e for e in entries if e is not None), key=lambda e: (e.key, e.path))


def _filesystem(store: CacheStore) -> fs.FileSystem:
    try:
        return store.filesystem()
    except (OSError, ValueError) as exc:
        raise CacheStoreError(f"{store.uri}: {storage_error_cause(exc)}") from None


def _entry(store: CacheStore, filesystem: fs.FileSystem, name: str, infos: list[fs.FileInfo],
           now: float) -> Optional[CacheEntry]:
    path = f"{store.folder}/{name}"
    files = {i.path[len(path):].lstrip("/"): i for i in infos if i.type == fs.FileType.File}
    if not files and not any(i.path == path and i.type == fs.FileType.Directory for i in infos):
        return None  # a stray file next to the cache folders
    times = [i.mtime.timestamp() for i in infos if i.mtime is not None]
    newest = max(times) if times else None
    staging = name.startswith(".")  # a local build's `.<key>-XXXX` folder, renamed into place when complete
    key = name[1:].split("-", 1)[0] if staging else name
    entry = CacheEntry(key=key, path=path, state="complete", size=sum(i.size or 0 for i in files.values()))
    index = None if staging or INDEX_FILE not in files else _read_json(filesystem, f"{path}/{INDEX_FILE}")
    if index is None:
        entry.last_used = newest
        entry.state = "building" if newest is not None and now - newest < BUILD_GRACE_S else "abandoned"
        return entry
    entry.created = files[INDEX_FILE].mtime.timestamp() if files[INDEX_FILE].mtime else None
    marker = files.get(LAST_USED_FILE)
    used = marker.mtime.timestamp() if marker is not None and marker.mtime is not None else None
    entry.last_used = max(t for t in (used, entry.created) if t is not None) if (used or entry.created) else None
    entry.records = (index.get("report") or {}).get("records")
    entry.source = index.get("path")
    return entry


def _read_json(filesystem: fs.FileSystem, path: str) -> Optional[dict[str, Any]]:
    try:
        with filesystem.open_input_stream(path) as stream:
            content = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


@dataclass
class Removal:
    """A cache [`plan_prune`] removes, and why (`abandoned build`, `named`, `unused for 9d`, `least recently used`)."""

    entry: CacheEntry
    reason: str


@dataclass
class PruneReport:
    """What [`prune_caches`] removed (or, with `dry_run`, would remove).

    Attributes:
        store (`str`): The caches' folder.
        removed (`list[Removal]`): In the order removed.
        freed_bytes (`int`): Their bytes.
        total_bytes (`int`): All caches' bytes before.
        left_bytes (`int`): After.
        dry_run (`bool`): Nothing was removed.
        mirrors (`list[str]`): This machine's copies of removed object-store caches, removed with them.
        mirror_bytes (`int`): Their bytes.
        kept_recent (`list[str]`): Keys `--max-size` would have evicted but that were used within
            [`RECENT_USE_S`] (or are being built), when the total stays over the bound.
    """

    store: str
    removed: list[Removal] = field(default_factory=list)
    freed_bytes: int = 0
    total_bytes: int = 0
    left_bytes: int = 0
    dry_run: bool = False
    mirrors: list[str] = field(default_factory=list)
    mirror_bytes: int = 0
    kept_recent: list[str] = field(default_factory=list)

    def as_dict(self, store: Optional[CacheStore] = None) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "removed"}
        out["removed"] = [dict(r.entry.as_dict(store), reason=r.reason) for r in self.removed]
        return out


def plan_prune(
    entries: Sequence[CacheEntry],
    older_than: Optional[float] = None,
    max_bytes: Optional[int] = None,
    keys: Sequence[str] = (),
    now: Optional[float] = None,
) -> tuple[list[Removal], list[str]]:
    """Which caches to remove: every abandoned incomplete folder; the caches named by `keys`; complete caches not
    used for `older_than` seconds; then, while the rest is over `max_bytes`, complete caches least recently used
    first, except those used within [`RECENT_USE_S`]. A build in progress is never removed.

    Args:
        entries (`Sequence[CacheEntry]`): From [`list_caches`].
        older_than (`float`, *optional*): Seconds ([`parse_duration`]).
        max_bytes (`int`, *optional*): The bound on what is left ([`parse_size`]).
        keys (`Sequence[str]`, *optional*): Keys, or unique prefixes of them.
        now (`float`, *optional*): Default: now.

    Returns:
        `tuple[list[Removal], list[str]]`: The removals, and the keys kept although over `max_bytes`.

    Raises:
        `ValueError`: A key that names no cache, more than one, or only a build in progress.

    Example:

    ```python
    >>> old = CacheEntry("aaa", "/s/aaa", "complete", size=600, last_used=0.0)
    >>> new = CacheEntry("bbb", "/s/bbb", "complete", size=600, last_used=90_000.0)
    >>> [(r.entry.key, r.reason) for r in plan_prune([old, new], max_bytes=1000, now=100_000.0)[0]]
    [('aaa', 'least recently used')]
    ```
    """
    now = time.time() if now is None else now
    chosen: dict[str, Removal] = {}

    def take(entry: CacheEntry, reason: str) -> None:
        chosen.setdefault(entry.path, Removal(entry, reason))

    for entry in entries:
        if entry.state == "abandoned":
            take(entry, "abandoned build")
    for key in keys:
        matches = [e for e in entries if e.key.startswith(key.strip())] if key.strip() else []
        if not matches:
            raise ValueError(f"--key {key}: no cache with that key")
        if len({e.key for e in matches}) > 1:
            raise ValueError(f"--key {key}: names {len({e.key for e in matches})} caches; give more of the key")
        removable = [e for e in matches if e.state != "building"]
        if not removable:
            raise ValueError(f"--key {key}: being built (its newest file is {format_age(now - matches[0].last_used)} "
                             "old); not removed")
        for entry in removable:
            take(entry, "named")
    if older_than is not None:
        for entry in entries:
            if entry.complete and entry.last_used is not None and now - entry.last_used > older_than:
                take(entry, f"unused for {format_age(now - entry.last_used)}")
    kept_recent: list[str] = []
    if max_bytes is not None:
        left = sum(e.size for e in entries if e.path not in chosen)
        for entry in sorted((e for e in entries if e.path not in chosen and e.complete),
                            key=lambda e: (e.last_used or 0.0, e.key)):
            if left <= max_bytes:
                break
            if entry.last_used is not None and now - entry.last_used < RECENT_USE_S:
                kept_recent.append(entry.key)
                continue
            take(entry, "least recently used")
            left -= entry.size
        if left <= max_bytes:
            kept_recent = []
        else:
            kept_recent += [e.key for e in entries if e.state == "building"]
    return list(chosen.values()), kept_recent


def prune_caches(
    store: CacheStore,
    older_than: Optional[float] = None,
    max_bytes: Optional[int] = None,
    keys: Sequence[str] = (),
    dry_run: bool = False,
    mirrors: bool = True,
) -> PruneReport:
    """Remove caches from `store` as [`plan_prune`] chooses (`index.json` first, so no job finds half a cache), and
    for an object store this machine's copies of them.

    Args:
        store ([`CacheStore`]): Where.
        older_than (`float`, *optional*): Remove complete caches not used for this many seconds.
        max_bytes (`int`, *optional*): Evict least recently used caches until at most this many bytes are left.
        keys (`Sequence[str]`, *optional*): Remove these caches (keys or unique prefixes).
        dry_run (`bool`, *optional*, defaults to `False`): Only report what would be removed.
        mirrors (`bool`, *optional*, defaults to `True`): With an object store, also remove this machine's copies
            ([`~lorafleet.data.cache.mirror_root`]) of the removed keys.

    Returns:
        [`PruneReport`]

    Raises:
        `ValueError`: A bad `keys` entry (nothing removed).
        [`CacheStoreError`]: The storage cannot be listed, or a removal failed (what was removed before is said).

    Example:

    ```python
    >>> import tempfile
    >>> report = prune_caches(CacheStore.of_storage(tempfile.mkdtemp()), older_than=7 * 86400)
    >>> report.removed, report.freed_bytes
    ([], 0)
    ```
    """
    entries = list_caches(store)
    removals, kept_recent = plan_prune(entries, older_than, max_bytes, keys)
    total = sum(e.size for e in entries)
    freed = sum(r.entry.size for r in removals)
    report = PruneReport(store=store.uri, removed=removals, freed_bytes=freed, total_bytes=total,
                         left_bytes=total - freed, dry_run=dry_run, kept_recent=kept_recent)
    local = mirror_root() if mirrors and store.scheme else None
    if local is not None:
        for key in dict.fromkeys(r.entry.key for r in removals):
            if (local / key).is_dir():
                report.mirrors.append(str(local / key))
                report.mirror_bytes += _bytes_of(local / key)
    if dry_run:
        return report
    filesystem = _filesystem(store)
    for done, removal in enumerate(removals):
        try:
            _remove(filesystem, removal.entry.path)
        except (OSError, ValueError) as exc:
            raise CacheStoreError(f"{store.uri}: removed {done} of {len(removals)} caches, then could not remove "
                                  f"{removal.entry.key} ({storage_error_cause(exc)})") from None
    for mirror in report.mirrors:
        _remove(fs.LocalFileSystem(), mirror)
    return report


def _remove(filesystem: fs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(f"{path}/{INDEX_FILE}")
    except FileNotFoundError:
        pass
    except OSError:
        # pyarrow's local filesystem reports a missing file as a plain OSError
        if filesystem.get_file_info(f"{path}/{INDEX_FILE}").type != fs.FileType.NotFound:
            raise
    if filesystem.get_file_info(path).type != fs.FileType.NotFound:
        filesystem.delete_dir(path)


def _bytes_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
