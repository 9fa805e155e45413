"""Load a certificate chain and its private key into an `ssl.SSLContext` from memory.

`ssl.SSLContext.load_cert_chain` only reads paths. On Linux the path is an anonymous
memory file (`/proc/self/fd/N` of a memfd), so the key is never written to any filesystem.
Elsewhere it is a 0600 file inside a fresh 0700 directory, removed right after OpenSSL has
read it. The proxy's TLS contexts (`listeners.tls.contexts`) and the dev agent's peering
port (`proxy.devagent.peerwire`) both load their keys here.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile


def load_cert_chain(
    ctx: ssl.SSLContext, cert_pem: str, key_pem: str, *, name: str, use_memfd: bool = True
) -> None:
    """Load `cert_pem` (the leaf, then any intermediates) and `key_pem` into `ctx`.

    Args:
        name: names the memfd (or the temporary directory), as `/proc/<pid>/fd` shows it.
        use_memfd: False takes the fallback path even where memfds exist (for tests).

    Raises:
        ssl.SSLError, OSError, ValueError: as `ssl.SSLContext.load_cert_chain` does.
    """
    data = (cert_pem.strip() + "\n" + key_pem.strip() + "\n").encode()
    if use_memfd and hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix=f"{name}-")  # created 0700
    path = os.path.join(directory, "leaf.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(directory)
