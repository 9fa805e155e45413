from __future__ import annotations

import pytest

from proxy.errors import IdentityError
from proxy.identity import (
    SpiffeIDAgent,
    SpiffeIDMeshGateway,
    SpiffeIDServer,
    SpiffeIDService,
    SpiffeIDSigning,
    encode_serial,
    matches_expected,
    parse_spiffe_id,
)

TD = "11111111-2222-3333-4444-555555555555.consul"


@pytest.mark.parametrize(
    ("serial", "encoded"),
    [
        (0, ""),
        (5, "05"),
        (0x0E, "0e"),
        (128, "80"),
        (255, "ff"),
        (256, "01:00"),
        (0x0102030405, "01:02:03:04:05"),
        (int("ab" * 20, 16), ":".join(["ab"] * 20)),
    ],
)
def test_serial_encoding_matches_consul(serial: int, encoded: str) -> None:
    assert encode_serial(serial) == encoded


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web",
            SpiffeIDService(TD, "default", "dc1", "web"),
        ),
        (
            f"spiffe://{TD}/ap/part1/ns/ns1/dc/dc2/svc/db",
            SpiffeIDService(TD, "ns1", "dc2", "db", partition="part1"),
        ),
        (
            f"SPIFFE://{TD.upper()}/ns/default/dc/dc1/svc/web",
            SpiffeIDService(TD, "default", "dc1", "web"),
        ),
        (
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web%2Fx",
            SpiffeIDService(TD, "default", "dc1", "web/x"),
        ),
        (
            f"spiffe://{TD}/agent/client/dc/dc1/id/node1",
            SpiffeIDAgent(TD, "default", "dc1", "node1"),
        ),
        (f"spiffe://{TD}/agent/server/dc/dc1", SpiffeIDServer(TD, "dc1")),
        (f"spiffe://{TD}/gateway/mesh/dc/dc1", SpiffeIDMeshGateway(TD, "default", "dc1")),
        (f"spiffe://{TD}", SpiffeIDSigning(TD)),
        ("spiffe:///ns/default/dc/dc1/svc/web", SpiffeIDService("", "default", "dc1", "web")),
    ],
)
def test_parse_spiffe_ids(uri: str, expected: object) -> None:
    assert parse_spiffe_id(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"https://{TD}/ns/default/dc/dc1/svc/web", "SPIFFE ID must have 'spiffe' scheme"),
        (f"spiffe://{TD}/ns/default/dc/dc1", "SPIFFE ID is not in the expected format"),
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/web/extra", "not in the expected format"),
        ("spiffe://nodots", "not in the expected format"),
        ("", "SPIFFE ID must have 'spiffe' scheme"),
    ],
)
def test_parse_rejects_with_consul_texts(uri: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        parse_spiffe_id(uri)


def test_service_uri_round_trips() -> None:
    ident = SpiffeIDService(TD, "default", "dc1", "web", partition="p1")
    assert ident.uri() == f"spiffe://{TD}/ap/p1/ns/default/dc/dc1/svc/web"
    assert parse_spiffe_id(ident.uri()) == ident


@pytest.mark.parametrize(
    ("peer", "ok"),
    [
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/db", True),
        ("spiffe://other-domain.consul/ns/default/dc/dc1/svc/db", True),  # host ignored
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/DB", True),  # case-insensitive
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/web", False),
        (f"spiffe://{TD}/ns/default/dc/dc2/svc/db", False),
        (f"spiffe://{TD}/ns/other/dc/dc1/svc/db", False),
        ("not a uri at all", False),
    ],
)
def test_server_identity_check(peer: str, ok: bool) -> None:
    expected = SpiffeIDService("", "default", "dc1", "db")
    assert matches_expected(peer, expected) is ok
