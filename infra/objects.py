"""Where PrivAds keeps its files: a local directory, or a prefix of an S3 bucket (``PRIVADS_DATA=s3://…``).

The model versions, the event archive and the exports are written and read through
``Objects``, one interface over both (pyarrow's file systems underneath), so every
host of a deployment can share them without a shared disk. Keys are ``/``-separated
paths below the root.

What each backend promises:

- ``put`` and ``put_all`` publish whole files: a reader sees a file complete or not at
  all. On a directory: a temporary name, then a rename. On S3: one PUT per object,
  which S3 makes visible only once complete (no temporary object is needed).
- ``put_all`` is all or none: a failure removes what it wrote (temporary files on a
  directory, the objects already PUT on S3) and raises.
- A directory is also flushed to disk where it matters (``sync``); S3 acknowledges a
  PUT once it is durable.

A set of files published as one (a model version) is made visible by writing its
marker last (``publish_dir``): readers treat a version without its manifest as absent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from privads.infra.settings import Settings


class Objects:
    """A tree of files under a root: a local directory or an S3 prefix.

    Parameters
    ----------
    fs : pyarrow.fs.FileSystem
        ``LocalFileSystem`` or ``S3FileSystem``.
    root : str
        The root's path in ``fs`` (an absolute directory, or ``bucket/prefix``).
    url : str
        How the root is shown and recorded (a directory, or ``s3://bucket/prefix``).
    cache : Path, optional
        Where ``fetch_dir`` keeps this host's copies of S3 directories (model versions).
    """

    # copies ``fetch_dir`` keeps: the newest by name (model versions are named by time)
    CACHED = 8

    def __init__(self, fs: pafs.FileSystem, root: str, url: str, cache: Path | None = None) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.cache = cache

    def with_cache(self, cache: Path) -> Objects:
        return Objects(self.fs, self.root, self.url, cache)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Objects({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def child(self, *parts: str) -> Objects:
        """The tree below ``parts`` (``data.child("archive")``)."""
        sub = "/".join(p.strip("/") for p in parts if p)
        return Objects(self.fs, f"{self.root}/{sub}", f"{self.url}/{sub}", self.cache) if sub else self

    def path(self, key: str) -> str:
        """``key``'s path in ``fs``."""
        return f"{self.root}/{key}" if key else self.root

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def local_path(self, key: str = "") -> Path | None:
        """``key``'s path on this host's disk, or None on S3."""
        return Path(self.path(key)) if self.is_local else None

    # --- reading ---

    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self.path(key)).type == pafs.FileType.File

    def get(self, key: str) -> bytes:
        """A file's bytes. Raises FileNotFoundError naming it if absent."""
        try:
            with self.fs.open_input_stream(self.path(key)) as f:
                return bytes(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url_of(key)} not found") from None

    def files(self, prefix: str = "") -> list[str]:
        """The keys of every file below ``prefix`` (recursively), sorted; none if it does not exist."""
        base = self.path(prefix)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        start = len(self.root) + 1
        return sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)

    def dirs(self, prefix: str = "") -> list[str]:
        """The names of the directories right below ``prefix``, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(prefix), recursive=False, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_table(self, key: str, schema: pa.Schema | None = None) -> pa.Table:
        """A Parquet file as a table (``schema``: the columns to read, and their types)."""
        return pq.read_table(self.path(key), schema=schema, filesystem=self.fs)

    def parquet_metadata(self, key: str) -> pq.FileMetaData:
        """A Parquet file's footer (its statistics), without reading its rows."""
        with self.fs.open_input_file(self.path(key)) as f:
            return pq.ParquetFile(f).metadata

    # --- writing ---

    def put(self, key: str, data: bytes, sync: bool = False) -> None:
        """Publish ``data`` as ``key`` whole (``sync``: flushed to disk before it is visible, on a directory)."""
        self.put_all([(key, data)], sync=sync)

    def put_all(self, items: Iterable[tuple[str, bytes]], sync: bool = False) -> None:
        """Publish every file, all or none (see the module's docstring)."""
        items = list(items)
        if self.is_local:
            staged: list[tuple[Path, Path]] = []
            try:
                for key, data in items:
                    path = Path(self.path(key))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # dot-prefixed and unique: no reader's glob matches it, no two writers share it
                    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
                    staged.append((tmp, path))
                    with open(tmp, "wb") as f:
                        f.write(data)
                        if sync:
                            f.flush()
                            os.fsync(f.fileno())
                for tmp, path in staged:  # renames take no data blocks: a full disk fails the writes, not these
                    os.replace(tmp, path)
                if sync:
                    for parent in {path.parent for _, path in staged}:
                        fsync_dir(parent)
            finally:
                for tmp, _ in staged:  # what was not renamed (nothing, unless a write failed)
                    tmp.unlink(missing_ok=True)
            return
        written: list[str] = []
        try:
            for key, data in items:
                with self.fs.open_output_stream(self.path(key)) as out:
                    out.write(data)
                written.append(key)
        except BaseException:
            for key in written:  # all or none
                self.delete(key, missing_ok=True)
            raise

    def delete(self, key: str, missing_ok: bool = True) -> None:
        """Remove a file."""
        path = self.path(key)
        if self.is_local:
            Path(path).unlink(missing_ok=missing_ok)
            return
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            # after the DELETE, pyarrow PUTs a "directory marker" key (``dir/``) when the directory looks empty;
            # some S3-compatible servers (localbucket) refuse such keys. The file itself is gone if that was all
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                raise

    def delete_tree(self, prefix: str) -> int:
        """Remove every file below ``prefix`` (and, on a directory, the directories); returns files removed."""
        keys = self.files(prefix)
        if self.is_local:
            shutil.rmtree(self.path(prefix), ignore_errors=True)
            return len(keys)
        for key in keys:  # one by one: not every S3-compatible server has DeleteObjects
            self.delete(key)
        return len(keys)

    # --- directories of files (model versions) ---

    def publish_dir(self, src: Path, prefix: str, last: str) -> None:
        """Copy the files of local directory ``src`` below ``prefix``, ``last`` (a marker, e.g. a manifest) after
        every other one: a reader that waits for ``last`` sees the whole set."""
        files = sorted(p for p in src.rglob("*") if p.is_file())
        rel = [p.relative_to(src).as_posix() for p in files]
        if last not in rel:
            raise FileNotFoundError(f"{src}: no {last} to publish last")
        for name, p in sorted(zip(rel, files, strict=True), key=lambda t: t[0] == last):
            self.put(f"{prefix}/{name}", p.read_bytes())

    def fetch_dir(self, prefix: str) -> Path:
        """A local copy of the files below ``prefix``: ``cache/prefix``, downloaded once (whole, then renamed into
        place; a copy that exists is complete), the ``CACHED`` newest copies kept. On a directory, the directory
        itself."""
        if self.is_local:
            return Path(self.path(prefix))
        cache = self.cache
        if cache is None:
            raise ValueError(f"{self.url}: fetching {prefix} needs a cache directory")
        final = cache / prefix
        if final.is_dir():
            return final
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
        try:
            keys = self.files(prefix)
            if not keys:
                raise FileNotFoundError(f"{self.url_of(prefix)}: nothing there")
            for key in keys:
                dest = tmp / key[len(prefix) + 1:]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.get(key))
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.rename(final)
            except OSError:
                if not final.is_dir():  # not another process's copy, renamed first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        copies = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in copies[:-self.CACHED]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final


def table_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a file created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local(path: Path | str) -> Objects:
    """A local directory as ``Objects``."""
    root = Path(path).resolve()
    return Objects(pafs.LocalFileSystem(), str(root), str(root))


def as_objects(root: Objects | Path | str) -> Objects:
    """``root`` as ``Objects`` (a path is a local directory)."""
    return root if isinstance(root, Objects) else local(root)


def s3(url: str, endpoint: str | None = None, access_key: str | None = None, secret_key: str | None = None,
       region: str = "us-east-1") -> Objects:
    """An ``s3://bucket[/prefix]`` URL as ``Objects``.

    ``endpoint``: an S3-compatible server's URL (``http://host:port``; unset: AWS). Without keys, the
    file system is anonymous.
    """
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    root = url[len("s3://"):].strip("/")
    if not root.split("/", 1)[0]:
        raise ValueError(f"{url!r} names no bucket")
    creds: dict[str, object] = (
        {"access_key": access_key, "secret_key": secret_key or ""} if access_key else {"anonymous": True})
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region, **creds)
    return Objects(fs, root, f"s3://{root}")


def at(target: str | Path, settings: Settings | None = None) -> tuple[Objects, str]:
    """A file named by a path or an ``s3://bucket/key`` URL (credentials from ``settings``): its directory's
    ``Objects`` and its name there."""
    text = str(target)
    if not text.startswith("s3://"):
        path = Path(text)
        return local(path.parent), path.name
    parent, _, name = text.rstrip("/").rpartition("/")
    if not name or parent == "s3:/":
        raise ValueError(f"{text}: an s3:// URL of a file names its bucket and key (s3://bucket/key)")
    if settings is None:
        raise ValueError(f"{text}: reaching S3 needs the settings (its endpoint and credentials)")
    return _s3_with(parent, settings), name


@contextlib.contextmanager
def local_copy(target: str | Path, settings: Settings | None = None) -> Iterator[Path]:
    """A file named by a path (itself) or an ``s3://`` URL (a temporary copy, removed on exit) on this host."""
    if not str(target).startswith("s3://"):
        yield Path(target)
        return
    where, name = at(target, settings)
    with tempfile.TemporaryDirectory(prefix="privads-") as tmp:
        copy = Path(tmp) / name
        copy.write_bytes(where.get(name))
        yield copy


def data_of(settings: Settings) -> Objects:
    """PRIVADS_DATA as ``Objects``: the directory, or the S3 prefix with the AWS_* settings."""
    if not settings.data_on_s3:
        return local(settings.data)
    return _s3_with(settings.data, settings)


def _s3_with(url: str, settings: Settings) -> Objects:
    """``s3(url)`` with the endpoint, credentials and region of the AWS_* settings."""
    secret = settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
    return s3(url, settings.aws_endpoint_url, settings.aws_access_key_id, secret, settings.aws_region)


def archive_of(settings: Settings) -> Objects:
    """The event archive (``streams/archive.py``)."""
    return data_of(settings).child("archive")


def models_of(settings: Settings) -> Objects:
    """The model versions (``ranker/artifacts.py``); on S3, this host keeps the ones it reads in LOCAL_DATA."""
    if not settings.data_on_s3:
        return local(settings.models_dir)
    return data_of(settings).child("models").with_cache(settings.local / "cache" / "models")
