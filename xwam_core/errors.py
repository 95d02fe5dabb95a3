"""User-facing errors: one line that names the file/key/value and what was expected."""

from __future__ import annotations

import errno
import os
import socket


class XWAMError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits non-zero."""


class RecipeError(XWAMError):
    """A recipe file or override that does not match the recipe schema."""


class DataError(XWAMError):
    """A source, store or episode that is missing, corrupt or inconsistent."""


def first_line(error: BaseException) -> str:
    """A library's exception in a few words for a one-line message: its first non-blank line, else its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def require(ok: bool, key: str, expected: str, value: object) -> None:
    """Refuse a setting outside its range with the recipe's one line, unless `ok`:
    `train.lr: expected a learning rate > 0, got -0.001` (the recipe loader puts the file name in front)."""
    if not ok:
        raise RecipeError(f"{key}: expected {expected}, got {value!r}")


# errno -> what happened and what was expected instead; the path (when the OS names one) goes in front
_OS_ERRORS: dict[str, str] = {
    "ENOENT": "no such file or folder",
    "EACCES": "permission denied; expected a path this user may read (and write, for outputs)",
    "EPERM": "operation not permitted; expected a path this user may read (and write, for outputs)",
    "EROFS": "on a read-only file system; expected a writable location for outputs",
    "ENOSPC": "no space left on the device; free some space or write elsewhere",
    "EDQUOT": "disk quota exceeded; free some space or write elsewhere",
    "EISDIR": "is a folder; expected a file",
    "ENOTDIR": "a part of this path is a file; expected a folder",
    "ENOTEMPTY": "folder not empty",
    "EEXIST": "already exists",
    "ENAMETOOLONG": "name too long for the file system",
    "ELOOP": "too many symbolic links",
    "EMFILE": "too many open files; raise `ulimit -n` or lower data.num_workers",
}


def os_error_line(error: OSError) -> str:
    """An OSError as the project's one line: the path(s) the OS names, what happened, what was expected
    (`out/run: on a read-only file system; expected a writable location for outputs [EROFS]`)."""
    name = errno.errorcode.get(error.errno or -1, "")
    what = _OS_ERRORS.get(name) or (error.strerror or str(error) or type(error).__name__)
    if name == "EEXIST" and error.filename is not None and os.path.isfile(error.filename):
        what = "already exists as a file; expected a folder, or nothing, there"  # mkdir over a file
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    where = " -> ".join(paths) if paths else "a file operation (the OS named no path)"
    return f"{where}: {what}" + (f" [{name}]" if name else "")


# errno -> what a failed bind or connect means and what to do instead ({port}: the option naming the port)
_NETWORK_ERRORS: dict[str, str] = {
    "EADDRINUSE": "address already in use; choose another {port} (or stop what listens there)",
    "EADDRNOTAVAIL": "not an address of this machine; expected one of its addresses (127.0.0.1, or 0.0.0.0 "
    "for every interface)",
    "ENODEV": "not an address of this machine, nor a host name that resolves to one; expected one of its "
    "addresses (127.0.0.1, or 0.0.0.0 for every interface)",
    "EACCES": "permission denied; ports below 1024 need privileges: choose a {port} from 1024 to 65535",
    "EAFNOSUPPORT": "address family not supported by this machine; expected an IPv4 address such as 127.0.0.1",
}


def network_error_line(
    host: str, port: int | None, error: OSError | ValueError, port_option: str = "--port"
) -> str:
    """A failed resolve, bind or connect as the project's one line, naming the address (host:port) instead of
    a path: `--host 256.1.1.1: cannot resolve this host name (Name or service not known)`,
    `127.0.0.1:8000: address already in use; choose another --port (or stop what listens there) [EADDRINUSE]`.
    A ValueError is a host name the resolver refused to look up (too long, a NUL character)."""
    shown = host if host and not any(c.isspace() for c in host) else repr(host)
    if isinstance(error, socket.gaierror):
        reason = error.strerror or str(error)
        return f"--host {shown}: cannot resolve this host name ({reason}); expected an IP address or a known host name"
    if not isinstance(error, OSError):
        reason = " ".join(str(error).split()) or type(error).__name__
        return f"--host {host!r}: not a valid host name ({reason}); expected an IP address or a host name"
    name = errno.errorcode.get(error.errno or -1, "")
    what = _NETWORK_ERRORS.get(name, "").format(port=port_option)
    if name == "EACCES" and (port is None or port >= 1024):  # not a privileged port: say only what happened
        what = "permission denied"
    if not what:
        what = (error.strerror or str(error) or type(error).__name__).lower()
    where = f"[{host}]" if ":" in host else host
    if port is not None:
        where += f":{port}"
    return f"{where}: {what}" + (f" [{name}]" if name else "")
