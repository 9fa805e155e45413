"""pyOpenSSL's failures in OpenSSL's own words, for the `openssl` engine
(`listeners.tls.openssl`) and the contexts' self-test (`listeners.tls.contexts`).

Rule 1: read only after a call has failed; nothing here is on a connection's path.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

_binding = Binding()
_lib: Any = _binding.lib
_ffi: Any = _binding.ffi


def _verify_result(conn: SSL.Connection) -> str:
    """OpenSSL's words for why this side refused the peer's chain ("" if it did not).

    pyOpenSSL reports "certificate verify failed" without the reason, and has no accessor for
    SSL_get_verify_result(). This reads it through cryptography's OpenSSL binding with the
    Connection's SSL pointer (pyOpenSSL's private `_ssl`), only after a handshake has
    failed. Without it, the error keeps OpenSSL's general words.
    """
    pointer = getattr(conn, "_ssl", None)
    if pointer is None:
        return ""
    code = _lib.SSL_get_verify_result(pointer)
    if code == 0:  # X509_V_OK
        return ""
    return str(_ffi.string(_lib.X509_verify_cert_error_string(code)).decode())


def error_text(conn: SSL.Connection | None, exc: SSL.Error) -> str:
    """One line from a pyOpenSSL error: the reasons OpenSSL queued, and the verify result."""
    if isinstance(exc, SSL.SysCallError):
        return "unexpected EOF: the peer closed the connection without close_notify"
    reasons: list[str] = []
    if exc.args and isinstance(exc.args[0], list):
        for item in exc.args[0]:
            reason = item[-1] if isinstance(item, tuple) and item else item
            if reason:
                reasons.append(str(reason))
    text = "; ".join(reasons) or type(exc).__name__
    if conn is not None and "certificate verify failed" in text:
        detail = _verify_result(conn)
        if detail:
            text = f"{text}: {detail}"
    return text
