"""Local paths and filesystem URIs in one place: every path maskray reads or writes outside a worker's
temporary directory (``tracking.storage_path``, checkpoints, ``data.shards``) goes through :func:`resolve`.

A location is a local path (``runs``, ``/data/demo``, ``~/x``, ``file:///x``) or a URI of a filesystem:
``s3://bucket/prefix`` and ``gs://bucket/prefix`` (pyarrow's own S3 and GCS filesystems; HDFS and ``abfs://`` as
well), or any other scheme fsspec knows (``memory://``, ``az://``, ... through the fsspec package that implements
it), wrapped as a pyarrow filesystem so that Ray Train's ``RunConfig(storage_filesystem=...)`` takes it too.

Credentials and endpoints come from the environment, as each library reads them (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...);
:func:`credential_env` collects the ones set, for a Ray runtime env, and nothing here logs them.

Nothing here runs a shell command: WebDataset's ``pipe:CMD`` URLs (a shell runs CMD, its output is the file) are
refused wherever a location enters (:func:`refuse_shell`), with one line naming it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

SHELL_PREFIXES = ("pipe:",)  # URL forms that WebDataset's gopen hands to a shell

# Environment variables the S3 / GCS / Azure clients read, forwarded to Ray workers (by prefix or name).
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_")


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def refuse_shell(location: str | os.PathLike, key: str = "") -> None:
    """A ValueError naming the location (and ``key`` when given) when it is a shell command (``pipe:...``)."""
    text = os.fspath(location)
    if text.lstrip().startswith(SHELL_PREFIXES):
        raise ValueError(f"{key + ': ' if key else ''}'{text}' is a shell command (pipe:), which maskray never runs; "
                         "read shards through a filesystem URI instead (s3://, gs://, any fsspec scheme) or a path")


def absolute(location: str | os.PathLike) -> str:
    """A URI unchanged (without a trailing ``/``); a local path (or ``file://`` URI) made absolute. A ``pipe:``
    command is refused (:func:`refuse_shell`)."""
    refuse_shell(location)
    text = os.fspath(location)
    if is_uri(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(os.path.expanduser(text))


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a filesystem URI (see the module docstring).

    Raises ValueError for a URI whose scheme neither pyarrow nor an installed fsspec package handles.
    """
    text = absolute(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), text
    try:
        return pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid:  # not one of pyarrow's own filesystems
        pass
    import fsspec

    try:
        filesystem, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"no filesystem for '{text}': {exc}") from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI."""
    return posixpath.join(location, *parts) if is_uri(location) else os.path.join(location, *parts)


def name(location: str) -> str:
    """The last component (``checkpoint_000001`` of ``s3://b/runs/r/checkpoint_000001``)."""
    return posixpath.basename(location.rstrip("/")) if is_uri(location) else os.path.basename(location)


def parent(location: str) -> str:
    return posixpath.dirname(location.rstrip("/")) if is_uri(location) else os.path.dirname(location)


def file_type(location: str) -> pafs.FileType:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type


def is_file(location: str) -> bool:
    return file_type(location) == pafs.FileType.File


def is_dir(location: str) -> bool:
    return file_type(location) == pafs.FileType.Directory


def list_dir(location: str) -> list[str]:
    """The names directly inside a directory (sorted; empty when it does not exist)."""
    filesystem, path = resolve(location)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


# An object store's unbuffered stream sends one ranged GET per read() call: a tar read header by header would cost
# thousands of requests per shard. Buffered, a read fetches this much at once.
STREAM_BUFFER_BYTES = 4 << 20


@contextmanager
def open_input(location: str) -> Iterator[BinaryIO]:
    """A readable binary stream (a plain ``open`` for a local path; an object read ahead in 4 MiB requests)."""
    if not is_uri(location):
        with open(absolute(location), "rb") as stream:
            yield stream
        return
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path, buffer_size=STREAM_BUFFER_BYTES) as stream:
        yield stream


def read_bytes(location: str) -> bytes:
    with open_input(location) as stream:
        return stream.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file (its parent directories created on a local disk)."""
    filesystem, path = resolve(location)
    filesystem.create_dir(posixpath.dirname(path) if is_uri(location) else os.path.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def remove(location: str) -> None:
    """Delete a file if it exists."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        filesystem.delete_file(path)


def make_dirs(location: str) -> None:
    """Create a directory and its parents (a no-op where the store has no directories, e.g. an S3 prefix)."""
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)


def credential_env(environ: os._Environ | dict[str, str] | None = None) -> dict[str, str]:
    """The storage credential and endpoint variables that are set (``AWS_*``, ``GOOGLE_*``, ``GCS_*``,
    ``AZURE_*``), to pass to Ray workers in a runtime env so they reach the same store as the driver."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key.startswith(CREDENTIAL_PREFIXES)}
