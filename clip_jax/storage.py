"""Local folders and object stores (gs://, s3://) behind one path type: `etils.epath`.

Every file the project reads or writes by name goes through `path()`, so a workdir, a data
directory, a tokenizer or a class-name file may be a local path or a bucket URL.

Clients and the variables they read (the standard ones; nothing project-specific):
  gs://  gcsfs for files (GOOGLE_APPLICATION_CREDENTIALS or the machine's account;
         STORAGE_EMULATOR_HOST for an emulator), tensorstore for checkpoint arrays and
         google-cloud-cpp inside array_record for dataset reads. Those two read their own
         emulator variables, TENSORSTORE_GCS_HTTP_URL and CLOUD_STORAGE_EMULATOR_ENDPOINT;
         both are set from STORAGE_EMULATOR_HOST when it is set and they are not.
  s3://  s3fs (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE,
         AWS_REGION). Orbax 0.12 writes checkpoint arrays to gs:// and local folders only, and
         array_record reads local and gs:// files only, so a workdir or data_dir on s3://
         is refused with one line (`require`); every other file may live there.

etils picks TensorFlow's gfile for remote paths when TensorFlow is installed; gfile has no
s3:// and ignores STORAGE_EMULATOR_HOST, so fsspec is chosen here (EPATH_USE_TF=false,
unless the environment says otherwise).
"""

from __future__ import annotations

import contextlib
import glob as globlib
import importlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import fsspec
from etils import epath

from clip_jax.errors import UserError

os.environ.setdefault("EPATH_USE_TF", "false")

# scheme -> the fsspec package that serves it
CLIENTS = {"gs": "gcsfs", "s3": "s3fs"}
INSTALL_HINT = "pip install 'clip_jax[cloud]'"

# What each scheme cannot hold, and why (see the module docstring).
_UNSUPPORTED = {
    ("s3", "checkpoints"): "orbax writes checkpoint arrays to gs:// or local folders only",
    ("s3", "datasets"): "array_record reads dataset files from gs:// or local folders only",
}


class StorageError(UserError):
    """A path that cannot be used: a missing client package, an unreachable bucket, no
    credentials, a file where a folder belongs, no permission."""


def scheme(p: str | os.PathLike) -> str | None:
    """'gs' or 's3' for a bucket URL, None for a local path."""
    s = os.fspath(p)
    head, sep, _ = s.partition("://")
    return head if sep and head in CLIENTS else None


def is_remote(p: str | os.PathLike) -> bool:
    return scheme(p) is not None


def resolve(p: str | os.PathLike) -> str:
    """A bucket URL unchanged (its client checked), a local path made absolute."""
    s = os.fspath(p)
    kind = scheme(s)
    if kind is None:
        return os.path.abspath(os.path.expanduser(s))
    _point_clients_at_emulator()  # before the clients import: gcsfs reads its switch then
    _load_client(kind, s)
    return s.rstrip("/")


def path(p: str | os.PathLike) -> epath.Path:
    """`resolve(p)` as an `epath.Path`: pathlib's interface on every backend."""
    return epath.Path(resolve(p))


def join(p: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` that keeps a bucket URL's `//`."""
    return str(path(p).joinpath(*parts)) if is_remote(p) else os.path.join(p, *parts)


def require(p: str | os.PathLike, holds: str, flag: str) -> None:
    """A StorageError when `p`'s scheme cannot hold `holds` ('checkpoints' or 'datasets')."""
    why = _UNSUPPORTED.get((scheme(p), holds))
    if why:
        raise StorageError(
            f"{flag}={os.fspath(p)}: {why}; use a gs:// bucket, a local folder, or the S3 "
            "bucket mounted as a folder (e.g. mountpoint-s3)"
        )


def _load_client(kind: str, p: str) -> None:
    package = CLIENTS[kind]
    try:
        importlib.import_module(package)
    except ImportError:
        raise StorageError(
            f"{p}: {kind}:// paths need the {package} package; install it with: {INSTALL_HINT}"
        ) from None
    if kind == "gs":
        logging.getLogger("gcsfs").addFilter(_drop_retry_tracebacks)


def _drop_retry_tracebacks(record: logging.LogRecord) -> bool:
    # gcsfs logs a request that ran out of retries with its whole traceback, then raises it;
    # the exception is what reaches the user, as one line with what to check.
    return "out of retries" not in str(record.msg)


def _point_clients_at_emulator() -> None:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)
    # gcsfs asks a gRPC service, which emulators lack, whether a bucket is zonal (60 s timeouts).
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _hint(p: str, error: BaseException) -> str:
    """What to check, from the kind of failure."""
    kind = scheme(p)
    name = type(error).__name__
    text = f"{name} {error}".lower()
    if kind == "s3":
        creds = "the AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        endpoint = "AWS_ENDPOINT_URL (for MinIO and other S3-compatible stores) and the network"
    else:
        creds = "the Google credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud auth)"
        endpoint = "STORAGE_EMULATOR_HOST (for an emulator) and the network"
    if any(w in text for w in ("credential", "access denied", "forbidden", "403", "permission")):
        return f"check {creds}"
    if any(w in text for w in ("connect", "timeout", "resolve", "unreachable", "refused")):
        return f"the endpoint is unreachable; check {endpoint}"
    if isinstance(error, FileNotFoundError) or "nosuchbucket" in text or "404" in text:
        return "check that the bucket exists"
    return f"check the bucket, {creds} and {endpoint}"


@contextlib.contextmanager
def access(p: str | os.PathLike, doing: str) -> Iterator[None]:
    """Turns a client's failure on a bucket URL into one StorageError naming `p` and the fix;
    local paths keep their OSError (the command lines print those in one line too). Our own
    errors raised inside (already one line with the fix) pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # each client (botocore, aiohttp, google-auth) has its own errors
        if not is_remote(p):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise StorageError(
            f"cannot {doing} {os.fspath(p)} ({type(e).__name__}: {first}); {_hint(str(p), e)}"
        ) from None


def check_writable_dir(p: str | os.PathLike, flag: str) -> str:
    """Creates folder `p` if needed and writes (then removes) a probe file in it; one
    StorageError naming `flag` and the fix otherwise. Returns `resolve(p)`."""
    resolved = resolve(p)
    folder = epath.Path(resolved)
    with access(resolved, "write to"):
        if folder.exists() and not folder.is_dir():
            raise StorageError(f"{flag}={resolved} is a file; pass a folder (new or existing)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_probe_{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            if is_remote(resolved):
                raise
            raise StorageError(
                f"{flag}={resolved} cannot be written ({e.strerror or e}); pass a writable folder"
            ) from e
    return resolved


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes `p` whole, so that a reader never sees part of it: local files by a rename,
    objects by one upload (an object store publishes an object only once it is complete)."""
    target = path(p)
    with access(p, "write"):
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_remote(p):
            target.write_text(text)
            return
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def is_file(p: str | os.PathLike) -> bool:
    """Whether `p` is a file; an unreachable bucket is a StorageError, never "no"."""
    with access(p, "read"):
        return path(p).is_file()


def is_dir(p: str | os.PathLike) -> bool:
    """Whether `p` is a folder (a bucket URL: whether objects lie under it); an unreachable
    bucket is a StorageError, never "no"."""
    with access(p, "read"):
        return path(p).is_dir()


def exists(p: str | os.PathLike) -> bool:
    """Whether `p` is a file or a folder; an unreachable bucket is a StorageError, never "no"."""
    with access(p, "read"):
        return path(p).exists()


def new_dir(p: str | os.PathLike) -> bool:
    """Creates folder `p` (and its parents) unless it already holds something, and says
    whether it did: an output folder is never mixed with what was there."""
    folder = path(p)
    with access(p, "write to"):
        if folder.exists() and any(folder.iterdir()):
            return False
        folder.mkdir(parents=True, exist_ok=True)
    return True


@contextlib.contextmanager
def local_file(target: str | os.PathLike) -> Iterator[str]:
    """A local path through which to write `target`, for writers that write local files
    only (array_record, safetensors): `target` itself when local; for a bucket URL, a
    temporary file, uploaded to `target` once the block ends without an error, then deleted."""
    if not is_remote(target):
        yield os.fspath(target)
        return
    with tempfile.TemporaryDirectory(prefix="clip_jax_upload_") as tmp:
        local = os.path.join(tmp, os.path.basename(os.fspath(target)))
        yield local
        upload_file(local, os.fspath(target))


def read_text(p: str | os.PathLike) -> str:
    with access(p, "read"):
        return path(p).read_text()


def glob(pattern: str) -> list[str]:
    """The files and folders matching `pattern` (`*`, `?`, `[...]`), sorted; a bucket URL's
    matches are bucket URLs."""
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    cut = min(i for i in (pattern.find(c) for c in "*?[") if i >= 0)
    base = pattern[: pattern.rindex("/", 0, cut)]  # the part without wildcards
    with access(pattern, "list"):
        return sorted(str(p) for p in path(base).glob(pattern[len(base) + 1 :]))


def list_files(folder: str | os.PathLike) -> list[str]:
    """The names of the files directly in `folder` (not its sub-folders), sorted; one listing
    request for a bucket folder."""
    fs, root = fsspec.core.url_to_fs(resolve(folder))
    with access(folder, "list"):
        entries = fs.ls(root, detail=True)
    return sorted(os.path.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "file")


def upload_file(local: str, remote: str) -> None:
    """Copies the local file `local` to the object `remote`, streamed (a dataset shard may
    not fit in memory)."""
    with access(remote, "upload to"), open(local, "rb") as src, path(remote).open("wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def upload_tree(local: str, remote: str) -> None:
    """Copies the local folder `local` to `remote` (a bucket URL), file by file."""
    for root, _, names in os.walk(local):
        rel = os.path.relpath(root, local)
        for name in names:
            parts = (name,) if rel == "." else (*rel.split(os.sep), name)
            upload_file(os.path.join(root, name), join(remote, *parts))


def move_tree(src: str, dst: str, last: str) -> None:
    """Moves every object under the bucket folder `src` to `dst` in the same store, the one
    named `last` after all the others, then deletes `src`. An object store has no rename:
    a folder moves object by object (server-side copies), so a reader that takes `last` as
    the sign of a complete folder never sees part of one."""
    fs, root = fsspec.core.url_to_fs(resolve(src))
    _, target = fsspec.core.url_to_fs(resolve(dst))
    with access(dst, "move to"):
        rels = sorted(f[len(root) + 1 :] for f in fs.find(root))
        first = [r for r in rels if r != last]
        fs.copy([f"{root}/{r}" for r in first], [f"{target}/{r}" for r in first])
        if last in rels:
            fs.copy(f"{root}/{last}", f"{target}/{last}")
        fs.rm(root, recursive=True)


def remove_tree(p: str | os.PathLike, first: str | None = None) -> None:
    """Deletes folder `p` if it exists, the file named `first` before the rest: a bucket
    folder is deleted object by object, so a reader that takes `first` as the sign of a
    complete folder never sees part of one."""
    folder = path(p)
    with access(p, "delete"):
        if first is not None:
            (folder / first).unlink(missing_ok=True)
        folder.rmtree(missing_ok=True)
