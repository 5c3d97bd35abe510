"""Paths that are local files or `gs://` URLs, through one API (etils.epath; gcsfs behind gs://).

Every path a user gives (workdir, data paths, outputs) goes through here or straight to epath / Orbax, so
nothing treats a URL as a local name: `os.path.abspath("gs://b/run")` is "./gs:/b/run", a folder on each host.
"""

import logging
import os
import tempfile

from etils import epath


def is_remote(path) -> bool:
    """True for URLs (gs://, s3://, ...), whose names must never pass through os.path."""
    return "://" in os.fspath(path)


def absolute(path) -> str:
    """A local path made absolute (so it does not depend on the working directory); a URL unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
    return os.fspath(epath.Path(path).joinpath(*parts))


def read_bytes(path) -> bytes:
    """A whole file: plain `open` for local files (the input pipeline's hot path), epath for URLs."""
    if is_remote(path):
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def size(path) -> int:
    return epath.Path(path).stat().length


def write_text(path, text: str) -> None:
    """Writes a whole file so that readers see the old content or the new one, never a mix: locally a
    temporary file renamed over it; on GCS one upload, which replaces the object only once it is complete."""
    target = epath.Path(path)
    if is_remote(path):
        target.write_text(text)
        return
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


def problem(path, want: str = "exists") -> str | None:
    """None if `path` exists (and, with want="dir" / "file", is one), else one line saying what is wrong.

    A missing gs:// object, a missing bucket, a bucket that cannot be reached and a missing gcsfs all end up as
    one readable line for `error:` messages instead of a traceback. (An endpoint that refuses connections is
    found by `unreachable` at once; one that accepts them and then fails is retried by gcsfs for about 30 s, which
    logs each failure with a traceback: those logs are held back here.)"""
    why = unreachable(path)
    if why:
        return why
    gcsfs_log = logging.getLogger("gcsfs")
    level = gcsfs_log.level
    gcsfs_log.setLevel(logging.CRITICAL)
    try:
        p = epath.Path(path)
        if want == "dir" and p.is_dir():
            return None
        if want == "file" and p.is_file():
            return None
        if want == "exists" and p.exists():
            return None
        if want != "exists" and p.exists():
            return f"not a {'directory' if want == 'dir' else 'file'}: {path}"
        bucket = _bucket(path)
        if bucket is not None and not epath.Path(bucket).exists():
            return f"no such bucket: {bucket} (in {path})"
        return f"no such {'directory' if want == 'dir' else 'file' if want == 'file' else 'file or directory'}: {path}"
    except ImportError as error:  # fsspec names the package to install
        return f"cannot read {path}: {error} (pip install -e '.[gcs]')"
    except Exception as error:  # gcsfs/aiohttp/google-auth raise many types for "cannot reach the bucket"
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return f"cannot reach {path}: {type(error).__name__}: {first_line}"
    finally:
        gcsfs_log.setLevel(level)


def unwritable(path, want: str = "dir") -> str | None:
    """None if this process can create or write the directory `path` (want="dir") or the file `path`
    (want="file"), else one line saying why not: checked before anything is compiled or written, so a bad
    --workdir / --out / --dst is one `error:` line instead of a traceback after minutes of work. Local paths get a
    real probe (an empty folder made and removed in the nearest existing folder), which sees read-only mounts,
    permissions and ACLs alike; gs:// paths get `unreachable`."""
    if is_remote(path):
        return unreachable(path)
    path = os.path.abspath(path)
    if want == "file" and os.path.isdir(path):
        return f"{path} is a directory"
    existing = path if want == "dir" else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    inside = f" (for {path})" if existing != path else ""
    if not os.path.isdir(existing):
        return f"{existing} is not a directory{inside}"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as error:
        return f"cannot write in {existing}{inside}: {error.strerror}"
    return None


PROBE_TIMEOUT_S = 5.0
_probed: dict[str, str | None] = {}


def _endpoints(path) -> list[str]:
    """The HTTP endpoints a gs:// path is reached through: gcsfs's (listings, metrics, events) and tensorstore's
    (Orbax checkpoints), each the public one unless an emulator's address is set for it."""
    if not os.fspath(path).startswith("gs://"):
        return []
    public = "https://storage.googleapis.com"
    gcsfs = os.environ.get("STORAGE_EMULATOR_HOST", "") or public
    gcsfs = gcsfs if gcsfs.startswith(("http://", "https://")) else f"http://{gcsfs}"
    return list(dict.fromkeys([gcsfs, os.environ.get("TENSORSTORE_GCS_HTTP_URL", "") or public]))


def unreachable(path) -> str | None:
    """None if the storage service behind a gs:// URL accepts a connection within PROBE_TIMEOUT_S (always None
    for other paths), else one line naming the bucket, the endpoint and the cause. Without it an unreachable
    endpoint costs a minute of the clients' retries and a page of tracebacks. Only a TCP connection is made (no
    request, no credentials); each endpoint is probed once per process."""
    import socket
    from urllib.parse import urlsplit

    for endpoint in _endpoints(path):
        if endpoint not in _probed:
            url = urlsplit(endpoint)
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=PROBE_TIMEOUT_S).close()
                _probed[endpoint] = None
            except OSError as error:
                why = "no answer within %gs" % PROBE_TIMEOUT_S if isinstance(error, TimeoutError) else (
                    error.strerror or str(error) or type(error).__name__)
                _probed[endpoint] = f"{endpoint}: {why}"
        if _probed[endpoint]:
            return f"cannot reach {_bucket(path)} (for {path}) at {_probed[endpoint]}"
    return None


def _bucket(path) -> str | None:
    """"gs://bucket" of a gs:// URL, else None."""
    path = os.fspath(path)
    return "gs://" + path[len("gs://"):].split("/", 1)[0] if path.startswith("gs://") else None


def _filesystem(url: str):
    import fsspec  # epath's gs:// backend; gcsfs provides the "gs" protocol

    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def list_remote_files(url: str, recursive: bool = True) -> list[str]:
    """Relative paths (posix) of the objects under `url`, in a few paginated listings rather than one request
    per folder or per object (an ImageNet train folder is 1.28M objects in 1,000 folders)."""
    fs, root = _filesystem(url)
    names = fs.find(root, withdirs=False, detail=False) if recursive else [
        entry["name"] for entry in fs.ls(root, detail=True) if entry["type"] != "directory"]
    prefix = root + "/"
    return [name[len(prefix):] for name in names if name.startswith(prefix)]


def list_remote_folders(url: str) -> list[str]:
    """Names of the immediate sub-folders (common prefixes) of `url`, in one listing."""
    fs, root = _filesystem(url)
    return [entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=True)
            if entry["type"] == "directory"]
