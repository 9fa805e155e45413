"""proxy.tlsstore and the contexts it builds (listeners.tls.contexts): readiness, refused
rotations, swaps, context settings, key handling, the words for a name-constraint refusal.

On both TLS engines, except the stdlib engine's key loader (memfd or a private file). Material
comes from the dev agent's CA. File-system access while the key is loaded is observed with an
audit hook (`sys.addaudithook`), installed once for this module and inert outside an explicit
window.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import ssl
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from listeners.tls.contexts import TLS12_CIPHERS, explain_verify_failure, load_cert_chain
from proxy.devagent import DevAgent
from proxy.devagent.ca import CertificateAuthority
from proxy.errors import TLSMaterialError
from proxy.tlsstore import TLSStore
from tests.certs import transport_handshake

pytestmark = pytest.mark.tls_engines()

# -- helpers ------------------------------------------------------------------------------


def _roots(agent: DevAgent) -> list[str]:
    return [r.cert_pem for r in agent.state.ca.roots]


def _leaf(agent: DevAgent, service: str = "web") -> tuple[str, str]:
    leaf = agent.state.ca.sign_leaf(service, datacenter="dc1")
    return leaf.cert_pem, leaf.private_key_pem


def _ready_store(agent: DevAgent, engine: str, service: str = "web") -> TLSStore:
    store = TLSStore(engine)
    assert store.set_roots(_roots(agent)) is False  # nothing to swap in without a leaf
    assert store.set_leaf(*_leaf(agent, service)) is True
    return store


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "proxy.tls" and "failed to rotate TLS material" in r.getMessage()
    ]


# -- readiness ----------------------------------------------------------------------------


async def test_not_ready_with_roots_only(agent: DevAgent, tls_engine: str) -> None:
    store = TLSStore(tls_engine)
    assert store.set_roots(_roots(agent)) is False
    assert not store.ready.is_set()
    assert store.material is None
    assert store.server_context() is None and store.client_context() is None


async def test_not_ready_with_leaf_only(agent: DevAgent, tls_engine: str) -> None:
    store = TLSStore(tls_engine)
    assert store.set_leaf(*_leaf(agent)) is False
    assert not store.ready.is_set()
    assert store.material is None


@pytest.mark.parametrize("leaf_first", [False, True])
async def test_ready_once_roots_and_leaf_both_arrived(
    agent: DevAgent, leaf_first: bool, tls_engine: str
) -> None:
    store = TLSStore(tls_engine)
    cert_pem, key_pem = _leaf(agent)
    if leaf_first:
        store.set_leaf(cert_pem, key_pem)
        assert store.set_roots(_roots(agent)) is True
    else:
        store.set_roots(_roots(agent))
        assert store.set_leaf(cert_pem, key_pem) is True
    async with asyncio.timeout(1):
        await store.wait_ready()
    material = store.material
    assert material is not None
    assert material.cert_pem == cert_pem
    assert material.leaf.uri == (
        f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/web"
    )
    assert store.server_context() is material.server
    assert store.client_context() is material.client
    assert store.rotations.value == 1


async def test_empty_roots_are_ignored(agent: DevAgent, tls_engine: str) -> None:
    store = TLSStore(tls_engine)
    store.set_leaf(*_leaf(agent))
    assert store.set_roots(["", "  \n"]) is False
    assert store.material is None


# -- refused rotations --------------------------------------------------------------------


async def test_leaf_from_a_foreign_ca_is_refused_and_the_old_material_kept(
    agent: DevAgent, caplog: pytest.LogCaptureFixture, tls_engine: str
) -> None:
    store = _ready_store(agent, tls_engine)
    before = store.material
    foreign = CertificateAuthority().sign_leaf("web", datacenter="dc1")

    assert store.set_leaf(foreign.cert_pem, foreign.private_key_pem) is False

    assert store.material is before
    assert store.rotations.value == 1
    (record,) = _refusals(caplog)
    assert record.levelno == logging.ERROR
    assert "does not verify against the CA roots" in record.getMessage()


@pytest.mark.parametrize(
    ("cert", "key"),
    [
        pytest.param("not a pem", None, id="cert-garbage"),
        pytest.param(
            None,
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
            id="key-garbage",
        ),
        pytest.param(None, "other-key", id="key-of-another-leaf"),
    ],
)
async def test_bad_leaf_pem_is_refused_and_the_old_material_kept(
    agent: DevAgent,
    caplog: pytest.LogCaptureFixture,
    cert: str | None,
    key: str | None,
    tls_engine: str,
) -> None:
    store = _ready_store(agent, tls_engine)
    before = store.material
    cert_pem, key_pem = _leaf(agent)
    if key == "other-key":
        key = _leaf(agent)[1]

    assert store.set_leaf(cert or cert_pem, key or key_pem) is False

    assert store.material is before
    assert len(_refusals(caplog)) == 1


async def test_bad_roots_pem_is_refused_and_the_old_material_kept(
    agent: DevAgent, caplog: pytest.LogCaptureFixture, tls_engine: str
) -> None:
    store = _ready_store(agent, tls_engine)
    before = store.material
    bad = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"

    assert store.set_roots([bad]) is False

    assert store.material is before
    (record,) = _refusals(caplog)
    assert "failed to load the CA roots" in record.getMessage()


async def test_leaf_that_arrives_before_its_roots_is_used_once_they_come(
    agent: DevAgent, tls_engine: str
) -> None:
    # A CA rotation without cross-signing: the new leaf comes first and cannot chain yet.
    store = _ready_store(agent, tls_engine)
    other = CertificateAuthority()
    leaf = other.sign_leaf("web", datacenter="dc1")
    assert store.set_leaf(leaf.cert_pem, leaf.private_key_pem) is False

    assert store.set_roots([r.cert_pem for r in other.roots]) is True

    assert store.material is not None
    assert store.material.leaf.serial == leaf.cert.serial_number
    assert store.rotations.value == 2


async def test_roots_update_after_a_refused_leaf_is_applied_with_the_last_good_leaf(
    agent: DevAgent, tls_engine: str
) -> None:
    store = _ready_store(agent, tls_engine)
    good = store.material
    assert good is not None
    assert store.set_leaf("not a pem", "not a key") is False

    agent.rotate_ca()
    new_roots = _roots(agent)
    assert store.set_roots(new_roots) is True

    assert store.material is not None
    assert store.material.roots == tuple(new_roots)
    assert store.material.leaf == good.leaf


async def test_leaf_renewal_after_refused_roots_is_applied_with_the_last_good_roots(
    agent: DevAgent, tls_engine: str
) -> None:
    store = _ready_store(agent, tls_engine)
    good = store.material
    assert good is not None
    bad = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    assert store.set_roots([bad]) is False

    cert_pem, key_pem = _leaf(agent)  # a renewal from the same, still valid, CA
    assert store.set_leaf(cert_pem, key_pem) is True

    assert store.material is not None
    assert store.material.roots == good.roots
    assert store.material.cert_pem == cert_pem


# -- rotation -----------------------------------------------------------------------------


async def test_ca_rotation_swaps_the_material_for_a_new_object(
    agent: DevAgent, tls_engine: str
) -> None:
    store = _ready_store(agent, tls_engine)
    first = store.material
    assert first is not None

    agent.rotate_ca()
    new_roots = _roots(agent)
    assert len(new_roots) == 2
    assert store.set_roots(new_roots) is True  # the old leaf still chains to the old root
    second = store.material
    assert second is not None and second is not first
    assert second.roots == tuple(new_roots)
    assert second.leaf == first.leaf

    cert_pem, key_pem = _leaf(agent)
    assert store.set_leaf(cert_pem, key_pem) is True
    third = store.material
    assert third is not None and third is not second
    assert third.cert_pem == cert_pem
    assert third.leaf.serial != first.leaf.serial
    assert third.server is not first.server and third.client is not first.client
    assert store.rotations.value == 3


async def test_contexts_from_two_stores_complete_a_mutual_handshake(
    agent: DevAgent, tls_engine: str
) -> None:
    web, db = _ready_store(agent, tls_engine, "web"), _ready_store(agent, tls_engine, "db")
    server, client = db.server_context(), web.client_context()
    assert server is not None and client is not None
    assert await transport_handshake(server, client) == (True, True)


async def test_context_from_a_foreign_ca_fails_the_handshake(
    agent: DevAgent, tls_engine: str
) -> None:
    db = _ready_store(agent, tls_engine, "db")
    other = CertificateAuthority()
    leaf = other.sign_leaf("web", datacenter="dc1")
    stranger = TLSStore(tls_engine)
    stranger.set_roots([r.cert_pem for r in other.roots])
    assert stranger.set_leaf(leaf.cert_pem, leaf.private_key_pem)
    server, client = db.server_context(), stranger.client_context()
    assert server is not None and client is not None
    client_ok, server_ok = await transport_handshake(server, client)
    assert not client_ok and not server_ok


async def test_contexts_use_consuls_tls_settings(agent: DevAgent, tls_engine: str) -> None:
    # The minimum version and the cipher list are also checked on the wire, against real
    # clients: tests/test_scenario_wire.py.
    store = _ready_store(agent, tls_engine)
    server, client = store.server_context(), store.client_context()
    if isinstance(server, ssl.SSLContext):
        assert isinstance(client, ssl.SSLContext)
        for ctx in (server, client):
            assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
            assert ctx.verify_mode == ssl.CERT_REQUIRED
            assert ctx.options & ssl.OP_NO_COMPRESSION
            assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert client.check_hostname is False
        assert server.protocol == ssl.PROTOCOL_TLS_SERVER
        assert client.protocol == ssl.PROTOCOL_TLS_CLIENT
        tls12 = {c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"}
    else:
        from OpenSSL import SSL

        assert isinstance(client, SSL.Context) and server is not None
        ciphers: set[str] = set()
        for ctx in (server, client):
            assert ctx.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            # A used context cannot be changed, not even by set_options(0): ask a connection.
            conn = SSL.Connection(ctx, None)
            options = conn.set_options(0)
            assert options & SSL.OP_NO_COMPRESSION
            assert options & SSL.OP_NO_RENEGOTIATION
            ciphers |= set(conn.get_cipher_list())
        tls12 = {c for c in ciphers if not c.startswith("TLS_")}  # TLS 1.3 suites: TLS_*
    assert tls12 <= set(TLS12_CIPHERS.split(":"))
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in tls12


# -- the key never touches the filesystem -------------------------------------------------

_WRITE_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_RDWR


@dataclass
class _FileAudit:
    """Records file-system audit events while `active`; inert otherwise."""

    installed: bool = False
    active: bool = False
    events: list[tuple[str, tuple[Any, ...], int | None]] = field(default_factory=list)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event not in ("open", "os.mkdir", "os.remove", "os.rmdir", "tempfile.mkdtemp"):
            return
        mode: int | None = None
        if event in ("os.remove", "os.rmdir"):
            # The hook runs before the call: the path still exists, so its permissions can
            # be read (os.stat raises no audit event).
            with contextlib.suppress(OSError):
                mode = stat.S_IMODE(os.stat(args[0]).st_mode)
        self.events.append((event, args, mode))

    @contextlib.contextmanager
    def window(self) -> Iterator[list[tuple[str, tuple[Any, ...], int | None]]]:
        self.events = []
        self.active = True
        try:
            yield self.events
        finally:
            self.active = False


_AUDIT = _FileAudit()


@pytest.fixture(scope="module")
def audit() -> _FileAudit:
    if not _AUDIT.installed:  # audit hooks cannot be removed: install once
        sys.addaudithook(_AUDIT)
        _AUDIT.installed = True
    return _AUDIT


def _writes(events: list[tuple[str, tuple[Any, ...], int | None]]) -> list[tuple[Any, ...]]:
    out = []
    for event, args, _ in events:
        if event != "open":
            continue
        _, mode, flags = args
        writes_by_mode = isinstance(mode, str) and bool(set(mode) & set("wax+"))
        writes_by_flags = isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
        if writes_by_mode or writes_by_flags:
            out.append(args)
    return out


linux_only = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux-only")
# The stdlib engine's loader: `ssl` reads keys only from paths. The openssl engine takes the
# key object and opens nothing (test_store_update_writes_no_file).
ssl_key_loader = pytest.mark.tls_engines("ssl")


@linux_only
@ssl_key_loader
def test_key_loader_is_memfd_on_linux(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real memfd_create, watched: the file OpenSSL is given is an anonymous memory file.
    made: list[str] = []
    memfd_create = os.memfd_create

    def watched(name: str, flags: int = os.MFD_CLOEXEC) -> int:
        fd = memfd_create(name, flags)
        made.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fd

    monkeypatch.setattr(os, "memfd_create", watched)
    cert_pem, key_pem = _ca_leaf(ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain(ctx, cert_pem, key_pem)  # the default: memfd where there is one
    assert made == ["/memfd:connect-proxy-leaf (deleted)"]
    # OpenSSL read the chain and the key from there: a key of another leaf is refused.
    with pytest.raises(TLSMaterialError, match="failed to load the leaf certificate and key"):
        load_cert_chain(ctx, cert_pem, _ca_leaf(ca)[1])
    assert len(made) == 2


def _ca_leaf(ca: CertificateAuthority) -> tuple[str, str]:
    leaf = ca.sign_leaf("web", datacenter="dc1")
    return leaf.cert_pem, leaf.private_key_pem


@linux_only
@ssl_key_loader
def test_memfd_loading_writes_no_file(ca: CertificateAuthority, audit: _FileAudit) -> None:
    cert_pem, key_pem = _ca_leaf(ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with audit.window() as events:
        load_cert_chain(ctx, cert_pem, key_pem, use_memfd=True)
    assert _writes(events) == []
    assert [e for e, _, _ in events if e in ("os.mkdir", "tempfile.mkdtemp")] == []


@linux_only
def test_store_update_writes_no_file(
    ca: CertificateAuthority, audit: _FileAudit, tls_engine: str
) -> None:
    roots, (cert_pem, key_pem) = [r.cert_pem for r in ca.roots], _ca_leaf(ca)
    # The first use of an engine imports modules, which may write bytecode caches.
    warm_up = TLSStore(tls_engine)
    warm_up.set_roots(roots)
    assert warm_up.set_leaf(*_ca_leaf(ca))
    store = TLSStore(tls_engine)
    with audit.window() as events:
        store.set_roots(roots)
        assert store.set_leaf(cert_pem, key_pem)
    assert _writes(events) == []
    assert [e for e, _, _ in events if e in ("os.mkdir", "tempfile.mkdtemp")] == []


@ssl_key_loader
def test_fallback_uses_a_private_file_in_a_private_directory_and_removes_both(
    ca: CertificateAuthority, audit: _FileAudit
) -> None:
    cert_pem, key_pem = _ca_leaf(ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tempfile.gettempdir()  # the first call probes the temp dir with a file of its own

    with audit.window() as events:
        load_cert_chain(ctx, cert_pem, key_pem, use_memfd=False)

    (mkdir,) = [args for e, args, _ in events if e == "os.mkdir"]
    directory, dir_mode_arg = mkdir[0], mkdir[1]
    assert os.path.basename(directory).startswith("connect-proxy-")
    assert dir_mode_arg == 0o700
    writes = _writes(events)
    assert len(writes) == 1
    path, _, flags = writes[0]
    assert os.path.dirname(path) == directory
    assert flags & os.O_CREAT and flags & os.O_EXCL  # created fresh, never reused
    assert [(args[0], mode) for e, args, mode in events if e == "os.remove"] == [(path, 0o600)]
    assert [(args[0], mode) for e, args, mode in events if e == "os.rmdir"] == [(directory, 0o700)]
    assert not os.path.exists(path) and not os.path.exists(directory)


@ssl_key_loader
def test_fallback_removes_the_file_when_the_key_does_not_load(
    ca: CertificateAuthority, audit: _FileAudit
) -> None:
    cert_pem, _ = _ca_leaf(ca)
    other_key = _ca_leaf(ca)[1]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tempfile.gettempdir()
    with audit.window() as events, pytest.raises(TLSMaterialError):
        load_cert_chain(ctx, cert_pem, other_key, use_memfd=False)
    (mkdir,) = [args for e, args, _ in events if e == "os.mkdir"]
    assert not os.path.exists(mkdir[0])


# -- explain_verify_failure ---------------------------------------------------------------

OPENSSL_NC = (
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
    "permitted subtree violation (_ssl.c:1006)"
)


def _constrained_root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Constrained Test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.NameConstraints([x509.DNSName("x.consul")], None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_explain_names_the_permitted_dns_names_for_a_subtree_violation() -> None:
    root, _ = _constrained_root()
    text = explain_verify_failure(OPENSSL_NC, [_pem(root)], "web.svc.default.abcd1234.consul")
    assert text.startswith(OPENSSL_NC)
    assert "permitted DNS names: x.consul" in text
    assert "'web.svc.default.abcd1234.consul'" in text
    assert "common name" in text


def test_explain_without_constrained_roots_says_unknown() -> None:
    other = CertificateAuthority()
    text = explain_verify_failure(OPENSSL_NC, [r.cert_pem for r in other.roots])
    assert "permitted DNS names: unknown" in text


def test_explain_without_roots_names_the_constraint_only() -> None:
    # The public listener's case: a client's chain refused during the handshake, where the
    # roots are the context's own.
    text = explain_verify_failure(OPENSSL_NC)
    assert text.startswith(f"{OPENSSL_NC}: a name constraint of the CA rejects the leaf's")
    assert "permitted DNS names" not in text
    assert "Consul's Go proxy does not" in text


@pytest.mark.parametrize(
    "error",
    [
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate",
        "",
    ],
)
def test_explain_leaves_other_errors_unchanged(error: str) -> None:
    root, _ = _constrained_root()
    assert explain_verify_failure(error, [_pem(root)], "web") == error


async def test_store_refusal_under_a_name_constrained_root_explains_itself(
    caplog: pytest.LogCaptureFixture, tls_engine: str
) -> None:
    # Consul 1.7-1.10 leaves carried a host-like CN; OpenSSL checks it against DNS name
    # constraints when there is no DNS SAN, Go's crypto/x509 does not.
    root, root_key = _constrained_root()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cn = "web.svc.default.abcd1234.consul"
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(
                        "spiffe://abcd1234.consul/ns/default/dc/dc1/svc/web"
                    )
                ]
            ),
            False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    store = TLSStore(tls_engine)
    store.set_roots([_pem(root)])

    assert store.set_leaf(_pem(leaf), key_pem) is False

    (record,) = _refusals(caplog)
    message = record.getMessage()
    assert "permitted subtree violation" in message
    assert "permitted DNS names: x.consul" in message
    assert repr(cn) in message
