"""Where the replay buffer keeps its files: a local directory or any pyarrow/fsspec filesystem URI.

The buffer needs four operations, each on whole small files: write a file so that readers see all of
it or none of it, read a file, list a folder, delete a file. :class:`BufferStore` is that interface;
:class:`LocalDirStore` implements it with POSIX calls (write + ``rename``, which survives a ``SIGKILL``;
with ``fsync`` also a power loss), :class:`ArrowFileSystemStore` with
``pyarrow.fs`` for everything else (S3, GCS, HDFS, fsspec filesystems such as ``memory://``).

One writer per URI: two buffers on the same URI would interleave sequence numbers and delete each
other's files. The driver gives each run its own ``<run_dir>/buffer``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

# suffix of a file still being written; a crashed writer leaves these behind and recovery removes them
TMP_SUFFIX = ".tmp"


class BufferStorageError(OSError):
    """The buffer's storage could not be opened, read or written (the message names the URI)."""


class BufferStore(ABC):
    """Whole-file storage under one root; names are ``/``-separated paths relative to the root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def describe(self, name: str) -> str:
        """The full location of ``name``, for error messages."""
        return f"{self.uri.rstrip('/')}/{name}"

    @abstractmethod
    def write_atomic(self, name: str, data: pa.Buffer) -> None:
        """Write ``data`` to ``name`` so that no reader, before or after a crash, sees part of it."""

    @abstractmethod
    def read(self, name: str) -> pa.Buffer:
        """The bytes of ``name`` (zero-copy where the backend allows, e.g. a memory map)."""

    @abstractmethod
    def list_names(self, folder: str) -> list[str]:
        """Names of the files directly in ``folder`` (relative to the root), sorted; [] if it is absent."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; a file already gone is not an error (deletes are retried after crashes)."""


class LocalDirStore(BufferStore):
    """A directory on the local filesystem.

    ``write_atomic`` writes ``name.tmp`` and renames it over ``name``: after a crash of the process
    ``name`` is either absent or complete (the kernel holds the written bytes; no flush is needed
    for that). With ``fsync=True`` it also ``fsync``s the file before the rename and the directory
    after it, so that after ``write_atomic`` returns the file survives a power loss too.
    """

    def __init__(self, uri: str, root: Path, fsync: bool = False) -> None:
        super().__init__(uri)
        self.root = root
        self.fsync = fsync
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BufferStorageError(f"cannot create the buffer directory {uri!r}: {exc}") from exc

    def write_atomic(self, name: str, data: pa.Buffer) -> None:
        path = self.root / name
        tmp = path.with_name(path.name + TMP_SUFFIX)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:  # the folder's first file (a mkdir per write costs more)
                path.parent.mkdir(parents=True, exist_ok=True)
                if self.fsync:  # the new folder's own entry
                    self._fsync_dir(path.parent.parent)
                fd = os.open(tmp, flags, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self.fsync:
                self._fsync_dir(path.parent)
        except OSError as exc:
            raise BufferStorageError(f"cannot write {self.describe(name)}: {exc}") from exc

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def read(self, name: str) -> pa.Buffer:
        try:
            with pa.memory_map(str(self.root / name)) as mapped:
                return mapped.read_buffer()
        except OSError as exc:
            raise BufferStorageError(f"cannot read {self.describe(name)}: {exc}") from exc

    def list_names(self, folder: str) -> list[str]:
        path = self.root / folder
        if not path.is_dir():
            return []
        return sorted(f"{folder}/{p.name}" for p in path.iterdir() if p.is_file())

    def delete(self, name: str) -> None:
        try:
            (self.root / name).unlink(missing_ok=True)
        except OSError as exc:
            raise BufferStorageError(f"cannot delete {self.describe(name)}: {exc}") from exc


class ArrowFileSystemStore(BufferStore):
    """A folder on a ``pyarrow.fs`` filesystem (S3, GCS, HDFS, or fsspec through ``PyFileSystem``).

    Object stores (S3, GCS, Azure) publish an object only when its upload completes, so a direct
    write is already all-or-nothing and a rename (a server-side copy there) would only double the
    traffic; other filesystems get ``name.tmp`` then ``move``.
    """

    _ATOMIC_PUT_TYPES = frozenset({"s3", "gcs", "abfs"})

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str) -> None:
        super().__init__(uri)
        self.fs = fs
        self.root = root.rstrip("/")
        self.direct_put = fs.type_name in self._ATOMIC_PUT_TYPES
        try:
            fs.create_dir(self.root, recursive=True)
        except (OSError, pa.ArrowException) as exc:
            raise BufferStorageError(f"cannot create the buffer folder {uri!r}: {exc}") from exc

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write_atomic(self, name: str, data: pa.Buffer) -> None:
        final = self._path(name)
        target = final if self.direct_put else final + TMP_SUFFIX
        try:
            self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(target) as out:
                out.write(data)
            if target != final:
                self.fs.move(target, final)
        except (OSError, pa.ArrowException) as exc:
            raise BufferStorageError(f"cannot write {self.describe(name)}: {exc}") from exc

    def read(self, name: str) -> pa.Buffer:
        try:
            with self.fs.open_input_file(self._path(name)) as f:
                return f.read_buffer()
        except (OSError, pa.ArrowException) as exc:
            raise BufferStorageError(f"cannot read {self.describe(name)}: {exc}") from exc

    def list_names(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (OSError, pa.ArrowException) as exc:
            raise BufferStorageError(f"cannot list {self.describe(folder)}: {exc}") from exc
        return sorted(f"{folder}/{i.base_name}" for i in infos if i.type == pafs.FileType.File)

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as exc:
            raise BufferStorageError(f"cannot delete {self.describe(name)}: {exc}") from exc


def open_store(uri: str, fsync: bool = False) -> BufferStore:
    """The store for ``uri``: a local path or ``file://`` URI, a URI ``pyarrow.fs`` knows, else fsspec.

    Raises:
        BufferStorageError: naming ``uri``, when no filesystem understands it or the root cannot be
            created (missing credentials, unknown bucket, read-only path, ...).
    """
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        path = pafs.FileSystem.from_uri(uri)[1] if scheme == "file" else uri
        return LocalDirStore(uri, Path(path), fsync=fsync)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:
        # pyarrow knows s3/gs/hdfs/abfs; everything else fsspec has a driver for (memory://, ...)
        try:
            import fsspec.core

            fsspec_fs, root = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError, OSError) as exc:
            raise BufferStorageError(f"no filesystem for the buffer URI {uri!r}: {exc}") from exc
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    except (OSError, pa.ArrowException) as exc:
        raise BufferStorageError(f"cannot open the buffer URI {uri!r}: {exc}") from exc
    return ArrowFileSystemStore(uri, fs, root)
