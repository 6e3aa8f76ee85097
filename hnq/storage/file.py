"""Local files: fetch (optionally confined to allowed roots) and the local-directory destination."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time

from hnq.errors import ConfigError, ErrorCode, ImageError, TransientError
from hnq.storage.base import Destination, Fetched, FetchPolicy, check_relpath, read_capped, too_large
from hnq.uris import InvalidURI, file_uri_to_path, path_to_file_uri

_TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR,
                     errno.ENOLINK if hasattr(errno, "ENOLINK") else errno.EIO}


def _real_roots(roots: tuple[str, ...]) -> list[str]:
    return [os.path.realpath(os.path.expanduser(r)) for r in roots]


def within_roots(path: str, roots: tuple[str, ...]) -> str | None:
    """The resolved path when it lies within one of ``roots`` (both resolved), else None."""
    real = os.path.realpath(path)
    for root in _real_roots(roots):
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return real
    return None


def confine(path: str, roots: tuple[str, ...] | None, uri: str) -> tuple[str, bool]:
    """(path to open, whether it was confined). Raises ``forbidden``."""
    if roots is None:
        return path, False
    if not roots:
        raise ImageError(f"{uri}: local files are not allowed here (no file roots configured; "
                         "set HARDNET_FILE_ROOTS)", ErrorCode.forbidden)
    real = within_roots(path, roots)
    if real is None:
        raise ImageError(f"{uri}: path is outside the allowed file roots", ErrorCode.forbidden)
    return real, True


def _os_error(e: OSError, uri: str, confined: bool) -> Exception:
    no = e.errno
    if no in (errno.ENOENT, errno.ENOTDIR):
        return ImageError(f"{uri}: no such file", ErrorCode.not_found)
    if no in (errno.EACCES, errno.EPERM):
        return ImageError(f"{uri}: permission denied", ErrorCode.access_denied)
    if no == errno.EISDIR:
        return ImageError(f"{uri}: is a directory", ErrorCode.not_found)
    if no == errno.ELOOP:
        if confined:  # O_NOFOLLOW tripped: the file became a symlink after we resolved it
            return ImageError(f"{uri}: symlink refused", ErrorCode.forbidden)
        return ImageError(f"{uri}: too many levels of symbolic links", ErrorCode.not_found)
    if no == errno.ENAMETOOLONG:
        return ImageError(f"{uri}: file name too long", ErrorCode.invalid_uri)
    if no in _TRANSIENT_ERRNOS:
        return TransientError(f"{uri}: I/O error reading the file ({e.strerror})")
    return ImageError(f"{uri}: cannot read the file ({e.strerror or e})", ErrorCode.fetch_error)


def fetch_file(uri: str, policy: FetchPolicy, on_size=None) -> Fetched:
    """``on_size(n)``: called with the file's size once it is known (``stat``), before it is read
    (the engine's byte budget may make it wait there)."""
    path = file_uri_to_path(uri)
    if not path:
        raise InvalidURI("empty path")
    path, confined = confine(path, policy.file_roots, uri)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if confined:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    deadline = time.monotonic() + policy.timeout_s
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(e, uri, confined) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{uri}: is a directory", ErrorCode.not_found)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{uri}: not a regular file", ErrorCode.not_found)
        if st.st_size > policy.max_bytes:
            raise too_large(uri, st.st_size, policy.max_bytes)
        if on_size is not None:
            on_size(st.st_size)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)

        def tick() -> None:
            if time.monotonic() > deadline:
                raise ImageError(f"{uri}: reading took longer than {policy.timeout_s}s",
                                 ErrorCode.timeout)

        try:
            data = read_capped(lambda n: os.read(fd, n), policy.max_bytes, uri, tick=tick)
        except OSError as e:
            raise _os_error(e, uri, confined) from None
    finally:
        os.close(fd)
    return Fetched(data=data, etag=None, size=len(data))


# ---------------------------------------------------------------- destination

_TMP_PREFIX = ".tmp-"


def _write_error(e: OSError, where: str) -> Exception:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return ConfigError(f"{where}: cannot write results there ({e.strerror})")
    return TransientError(f"{where}: write failed ({e.strerror or e})")


def _write_aside(path: str, data: bytes) -> str:
    """Write ``data`` to a new temp file beside ``path`` (same directory, so a rename or link is
    atomic), fsynced, mode 0644; returns its name. The caller links or renames it in place."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=_TMP_PREFIX + os.path.basename(path) + ".")
    try:
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


class FileDestination(Destination):
    """Results in a local (or network-mounted) directory. Writes are atomic: a temporary file in
    the same directory, fsync, then ``os.replace``."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.dest = path_to_file_uri(self.root).rstrip("/") + "/"

    def _path(self, relpath: str) -> str:
        return os.path.join(self.root, *check_relpath(relpath).split("/"))

    def uri(self, relpath: str = "") -> str:
        return path_to_file_uri(self._path(relpath)) if relpath else self.dest

    def put(self, relpath: str, data: bytes, content_type: str = "application/json") -> None:
        path = self._path(relpath)
        tmp = None
        try:
            tmp = _write_aside(path, data)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            raise _write_error(e, self.uri(relpath)) from None
        finally:
            _unlink_quietly(tmp)

    def get_versioned(self, relpath: str) -> tuple[bytes, str] | None:
        try:
            with open(self._path(relpath), "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise _write_error(e, self.uri(relpath)) from None

    def put_if(self, relpath: str, data: bytes, content_type: str = "application/json", *,
               expect: str | None = None) -> bool:
        """Check and write under an exclusive flock of the directory (writers of the same
        directory's conditional writes take turns); the new file is written and fsynced aside,
        then linked in (O_EXCL semantics: fails if the name exists) or renamed over the version
        that was checked."""
        path = self._path(relpath)
        tmp = None
        try:
            tmp = _write_aside(path, data)
            dfd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                fcntl.flock(dfd, fcntl.LOCK_EX)
                if expect is None:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                    return True
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    return False
                if f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}" != expect:
                    return False
                os.replace(tmp, path)
                tmp = None
                return True
            finally:
                os.close(dfd)      # releases the lock
        except OSError as e:
            raise _write_error(e, self.uri(relpath)) from None
        finally:
            _unlink_quietly(tmp)

    def get(self, relpath: str) -> bytes | None:
        try:
            with open(self._path(relpath), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise _write_error(e, self.uri(relpath)) from None

    def exists(self, relpath: str) -> bool:
        return os.path.isfile(self._path(relpath))

    def delete(self, relpaths: list[str]) -> int:
        for relpath in relpaths:
            path = self._path(relpath)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ConfigError(f"cannot delete {path}: {e.strerror or e}") from None
        return len(relpaths)

    def list(self, relprefix: str = "") -> list[str]:
        if relprefix:
            check_relpath(relprefix)
        rel_dir = relprefix.rsplit("/", 1)[0] if "/" in relprefix else ""
        base = os.path.join(self.root, *rel_dir.split("/")) if rel_dir else self.root
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                r = rel + name
                if r.startswith(relprefix):
                    out.append(r)
        return sorted(out)


def check_writable_dir(root: str) -> None:
    """Create the directory if needed and prove we can write a file there (ConfigError if not)."""
    try:
        os.makedirs(root, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=_TMP_PREFIX + "probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"destination directory {root!r} is not writable ({e.strerror or e})") from None
