"""Where runs write: a local directory or any URI pyarrow.fs understands (s3://, gs://, hdfs://...).

Every write is atomic for readers: local files go to a temporary name and are renamed into place;
object stores publish an object only when its upload completes. Every read of a table or a record gets
one whole version of it, though a run may replace it meanwhile (see ``_parsed``).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cpsc_ray.credentials import redacted, refuse_credentials
from cpsc_ray.errors import InputError

OBJECT_READ_ATTEMPTS = 10  # a replaced object's prefix is read again; a file this often unparseable is broken


def _around_path(uri: str, path: str) -> tuple[str, str]:
    """What a URI holds besides its filesystem path, and another process needs to reach the same store: what
    comes before the path (the scheme; a host, hdfs://namenode:8020) and the options after it (an S3-compatible
    store's ?endpoint_override=HOST:PORT&scheme=http). Credentials never travel in it (``cpsc_ray.credentials``)."""
    address = urlsplit(uri)
    located = (address.netloc + address.path).rstrip("/")
    # A path with %-escapes, which pyarrow decodes, is not found in the URI: only its scheme is kept.
    authority = located.removesuffix(path) if located.endswith(path) else ""
    return f"{address.scheme}://{authority}", f"?{address.query}" if address.query else ""


class Storage:
    def __init__(self, root: str):
        if "://" in root:
            refuse_credentials(root, "location")
            try:
                self.fs, path = pafs.FileSystem.from_uri(root)
            except pa.ArrowInvalid as err:
                raise InputError(
                    f"{redacted(root)}: not a location pyarrow can open ({err}); give a local path or a URI such as "
                    "s3://bucket/prefix"
                ) from None
        else:
            self.fs, path = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        self.root = path.rstrip("/") or "/"
        self._before, self._after = _around_path(root, self.root) if "://" in root else ("", "")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, *parts: str) -> str:
        """The full address of a path under the root: what another process or node should be given."""
        return self.uri_of(self.path(*parts))

    def uri_of(self, path: str) -> str:
        """The full address of any path on this storage's filesystem, such as a Ray checkpoint's ``path``
        (Ray strips the URI down to the filesystem's path, as pyarrow does)."""
        return f"{self._before}{path}{self._after}"

    @classmethod
    def of_file(cls, location: str) -> tuple["Storage", str]:
        """The storage of a file's directory and the file's name, for a path or a URI (its query kept)."""
        file = cls(location)
        return cls(file.uri_of(posixpath.dirname(file.root))), posixpath.basename(file.root)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def child(self, *parts: str) -> "Storage":
        return Storage(self.uri(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        if self.is_local:
            # A leading dot: readers of a directory as a dataset (pyarrow's ignore_prefixes) skip the staging file.
            staging = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
            with self.fs.open_output_stream(staging) as out:
                out.write(data)
            os.replace(staging, target)
        else:
            with self.fs.open_output_stream(target) as out:
                out.write(data)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode()

    def write_json(self, relative: str, value: Any) -> None:
        self.write_text(relative, json.dumps(value, indent=2, default=str))

    def read_json(self, relative: str) -> Any:
        return self._parsed(relative, json.loads)

    def write_parquet(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(relative, buffer.getvalue())

    def read_parquet(self, relative: str) -> pa.Table:
        return self._parsed(relative, lambda data: pq.read_table(pa.BufferReader(data)))

    def _parsed(self, relative: str, parse: Callable[[bytes], Any]) -> Any:
        """A file read whole, then parsed. Not pq.read_table(path): it reads the footer through one open and
        the pages through another, so a file replaced in between reads as "Page was smaller than expected".
        An object store's read is a HEAD for the size, then a ranged GET: an object replaced in between reads
        as a prefix of the new version, which does not parse (Parquet ends in its magic bytes, JSON in a
        bracket), so it is read again; a file that never parses raises what its parser raised."""
        for attempt in range(1, OBJECT_READ_ATTEMPTS + 1):
            data = self.read_bytes(relative)
            try:
                return parse(data)
            except (OSError, ValueError):  # pyarrow's and json's errors for bytes that are not a whole file
                if self.is_local or attempt == OBJECT_READ_ATTEMPTS:
                    raise

    def copy_in(self, source_uri: str, relative: str) -> None:
        """Copy a directory (any filesystem pyarrow reads) to ``relative`` under this root."""
        source = Storage(source_uri)
        self.makedirs(relative)
        pafs.copy_files(source.root, self.path(relative), source_filesystem=source.fs, destination_filesystem=self.fs)

    def move_dir(self, relative: str, to: str) -> None:
        """Move a directory over ``to`` (replacing it): one rename on a local filesystem; on an object store,
        which has none, a copy of every object and then a delete."""
        self.delete_dir(to)
        if self.is_local:
            os.replace(self.path(relative), self.path(to))
            return
        self.makedirs(to)
        pafs.copy_files(self.path(relative), self.path(to), source_filesystem=self.fs, destination_filesystem=self.fs)
        self.delete_dir(relative)

    def delete_dir(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.delete_dir(self.path(relative))

    def list_dirs(self, relative: str = "") -> list[str]:
        if not self.exists(relative):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(relative)))
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
