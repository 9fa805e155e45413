"""proxy.config: timeouts, addresses, upstreams, the agent's sidecar shape, the upstream diff."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from proxy.config import (
    DEFAULT_TLS_ENGINE,
    ProxyConfig,
    PublicListenerConfig,
    UpstreamConfig,
    load_agent_service,
    load_tls_engine,
    load_upstream,
    plan_upstreams,
    timeout_ms,
    upstream_key,
)
from proxy.devagent import DevAgent
from proxy.errors import ConfigError
from tests.conftest import register

# -- timeout_ms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (2500, 2.5),
        (2500.0, 2.5),
        (0.5, 0.0005),
        ("2500", 2.5),
        (" 2500 ", 2.5),
        ("2500.5", 2.5005),
        (None, 10.0),  # the default, 10000 ms
    ],
)
def test_timeout_ms_accepts_ints_floats_and_numeric_strings(value: Any, seconds: float) -> None:
    assert timeout_ms(value, "connect_timeout_ms", 10000) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [0, -1, -2500.0, 0.0, math.nan, "nan", True, False, "abc", "", [1000], {"ms": 1}],
)
def test_timeout_ms_rejects_non_positive_or_non_numbers_naming_the_field(value: Any) -> None:
    with pytest.raises(ConfigError, match="handshake_timeout_ms"):
        timeout_ms(value, "handshake_timeout_ms", 10000)


# -- load_upstream ------------------------------------------------------------------------


def test_upstream_defaults_match_consul() -> None:
    up = load_upstream({"DestinationName": "db", "LocalBindPort": 9191})
    assert up == UpstreamConfig(
        destination_name="db",
        local_bind_port=9191,
        destination_type="service",
        destination_namespace="default",
        destination_partition="default",
        datacenter="",
        local_bind_address="127.0.0.1",
        connect_timeout=10.0,
        config={},
    )


def test_upstream_fields_are_taken_from_the_agent_shape() -> None:
    up = load_upstream(
        {
            "DestinationType": "prepared_query",
            "DestinationName": "db-query",
            "DestinationNamespace": "ns1",
            "DestinationPartition": "p1",
            "Datacenter": "dc2",
            "LocalBindAddress": "127.0.0.2",
            "LocalBindPort": 9192,
            "Config": {"connect_timeout_ms": 250, "other": "kept"},
        }
    )
    assert up.destination_type == "prepared_query"
    assert up.destination_name == "db-query"
    assert (up.destination_namespace, up.destination_partition) == ("ns1", "p1")
    assert up.datacenter == "dc2"
    assert (up.local_bind_address, up.local_bind_port) == ("127.0.0.2", 9192)
    assert up.connect_timeout == pytest.approx(0.25)
    assert dict(up.config) == {"connect_timeout_ms": 250, "other": "kept"}


@pytest.mark.parametrize(
    ("raw_type", "expected"),
    [
        (None, "service"),
        ("", "service"),
        ("service", "service"),
        ("prepared_query", "prepared_query"),
        ("junk", "service"),  # Consul's proxy treats any other type as a service
    ],
)
def test_upstream_type_is_service_unless_prepared_query(
    raw_type: str | None, expected: str
) -> None:
    up = load_upstream(
        {"DestinationName": "db", "LocalBindPort": 9191, "DestinationType": raw_type}
    )
    assert up.destination_type == expected


@pytest.mark.parametrize("value", [2500, 2500.0, "2500"])
def test_upstream_connect_timeout_ms_is_honoured_in_every_json_shape(value: Any) -> None:
    # Go honours only Go ints, so JSON configs always get 10 s (connect/proxy/config.go); we don't.
    up = load_upstream(
        {"DestinationName": "db", "LocalBindPort": 9191, "Config": {"connect_timeout_ms": value}}
    )
    assert up.connect_timeout == pytest.approx(2.5)


def test_upstream_bad_connect_timeout_names_the_upstream_and_field() -> None:
    with pytest.raises(ConfigError, match=r"upstream db: connect_timeout_ms"):
        load_upstream(
            {"DestinationName": "db", "LocalBindPort": 9191, "Config": {"connect_timeout_ms": "x"}}
        )


@pytest.mark.parametrize(
    "raw",
    [
        {"LocalBindPort": 9191},
        {"DestinationName": "", "LocalBindPort": 9191},
        {"DestinationName": None, "LocalBindPort": 9191},
    ],
)
def test_upstream_without_destination_name_is_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="DestinationName must be set"):
        load_upstream(raw)


@pytest.mark.parametrize(
    "raw",
    [
        {"DestinationName": "db"},
        {"DestinationName": "db", "LocalBindPort": 0},
        {"DestinationName": "db", "LocalBindPort": None},
        {"DestinationName": "db", "LocalBindPort": -1},
        {"DestinationName": "db", "LocalBindPort": 65536},
        {"DestinationName": "db", "LocalBindPort": "9191"},
        {"DestinationName": "db", "LocalBindPort": True},
        {"DestinationName": "db", "LocalBindPort": 9191.5},
    ],
)
def test_upstream_without_a_usable_local_bind_port_is_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"^upstream db: upstream has no local_bind_port$"):
        load_upstream(raw)


def test_upstream_port_given_as_a_json_float_is_accepted() -> None:
    assert load_upstream({"DestinationName": "db", "LocalBindPort": 9191.0}).local_bind_port == 9191


def test_upstream_with_a_socket_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="local_bind_socket_path is not supported"):
        load_upstream({"DestinationName": "db", "LocalBindSocketPath": "/tmp/db.sock"})


def test_upstream_config_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ConfigError, match="upstream db: Config must be an object"):
        load_upstream({"DestinationName": "db", "LocalBindPort": 9191, "Config": ["x"]})


@pytest.mark.parametrize(
    ("upstream", "identity"),
    [
        (
            UpstreamConfig(destination_name="db", local_bind_port=9191),
            "127.0.0.1:9191->service:default/default/db",
        ),
        (
            UpstreamConfig(
                destination_name="q",
                local_bind_port=9192,
                destination_type="prepared_query",
                destination_namespace="ns1",
                destination_partition="p1",
                local_bind_address="::1",
            ),
            "[::1]:9192->prepared_query:p1/ns1/q",
        ),
    ],
)
def test_upstream_identity_is_consuls_log_format(upstream: UpstreamConfig, identity: str) -> None:
    assert upstream.label == identity


# -- load_agent_service -------------------------------------------------------------------

WEB_WITH_SIDECAR = {
    "Name": "web",
    "Port": 8080,
    "Connect": {
        "SidecarService": {
            "Proxy": {
                "Config": {"handshake_timeout_ms": 999, "local_connect_timeout_ms": 444},
                "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
            }
        }
    },
}


async def _agent_service(agent: DevAgent, service_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        await register(c, WEB_WITH_SIDECAR)
        r = await c.get(f"/v1/agent/service/{service_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


async def test_agent_sidecar_service_becomes_a_proxy_config(agent: DevAgent) -> None:
    raw = await _agent_service(agent, "web-sidecar-proxy")
    assert raw["Kind"] == "connect-proxy" and raw["Port"] == 21000 and raw["Address"] == ""

    cfg = load_agent_service(raw)

    assert cfg == ProxyConfig(
        service="web",
        public_listener=PublicListenerConfig(
            bind_address="0.0.0.0",
            bind_port=21000,
            local_service_host="127.0.0.1",
            local_service_port=8080,
            local_connect_timeout=0.444,
            handshake_timeout=0.999,
        ),
        upstreams=(
            UpstreamConfig(
                destination_name="db", local_bind_port=9191, local_bind_address="127.0.0.1"
            ),
        ),
    )


async def test_agent_service_that_is_not_a_connect_proxy_is_refused(agent: DevAgent) -> None:
    raw = await _agent_service(agent, "web")
    with pytest.raises(ConfigError, match="not a valid connect proxy"):
        load_agent_service(raw)


def test_agent_proxy_without_destination_is_refused() -> None:
    with pytest.raises(ConfigError, match="DestinationServiceName"):
        load_agent_service({"ID": "p", "Kind": "connect-proxy", "Port": 1, "Proxy": {}})


def test_agent_proxy_without_port_has_no_public_listener() -> None:
    cfg = load_agent_service(
        {"ID": "p", "Kind": "connect-proxy", "Proxy": {"DestinationServiceName": "web"}}
    )
    assert cfg == ProxyConfig(service="web", public_listener=None, upstreams=())


def test_agent_proxy_on_ipv6_local_address_is_bracketed() -> None:
    cfg = load_agent_service(
        {
            "ID": "p",
            "Kind": "connect-proxy",
            "Address": "::1",
            "Port": 21000,
            "Proxy": {
                "DestinationServiceName": "web",
                "LocalServiceAddress": "::1",
                "LocalServicePort": 8080,
            },
        }
    )
    assert cfg.public_listener is not None
    assert cfg.public_listener.bind_address == "::1"
    assert cfg.public_listener.local_service_address == "[::1]:8080"
    # Defaults when Proxy.Config is absent.
    assert cfg.public_listener.local_connect_timeout == 1.0
    assert cfg.public_listener.handshake_timeout == 10.0


def test_agent_proxy_with_a_bad_public_timeout_names_the_field() -> None:
    with pytest.raises(ConfigError, match="local_connect_timeout_ms"):
        load_agent_service(
            {
                "ID": "p",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {
                    "DestinationServiceName": "web",
                    "Config": {"local_connect_timeout_ms": "soon"},
                },
            }
        )


# -- plan_upstreams -----------------------------------------------------------------------

DB = UpstreamConfig(destination_name="db", local_bind_port=9191)
CACHE = UpstreamConfig(destination_name="cache", local_bind_port=9192)
DB_SLOW = UpstreamConfig(destination_name="db", local_bind_port=9191, connect_timeout=30.0)
DB_OTHER_PORT = UpstreamConfig(destination_name="db", local_bind_port=9193)


def _running(*ups: UpstreamConfig) -> dict[tuple[str, int], UpstreamConfig]:
    return {upstream_key(u): u for u in ups}


@pytest.mark.parametrize(
    ("running", "wanted", "stop", "start"),
    [
        pytest.param({}, (), [], [], id="nothing-running-nothing-wanted"),
        pytest.param({}, (DB, CACHE), [], [DB, CACHE], id="nothing-running"),
        pytest.param(_running(DB), (DB, CACHE), [], [CACHE], id="add-one"),
        pytest.param(_running(DB, CACHE), (DB,), [("127.0.0.1", 9192)], [], id="remove-one"),
        pytest.param(
            _running(DB, CACHE), (DB_SLOW, CACHE), [("127.0.0.1", 9191)], [DB_SLOW], id="change-one"
        ),
        pytest.param(
            _running(DB),
            (DB_OTHER_PORT,),
            [("127.0.0.1", 9191)],
            [DB_OTHER_PORT],
            id="move-port",
        ),
        pytest.param(_running(DB, CACHE), (CACHE, DB), [], [], id="unchanged"),
    ],
)
def test_plan_upstreams(
    running: dict[tuple[str, int], UpstreamConfig],
    wanted: tuple[UpstreamConfig, ...],
    stop: list[tuple[str, int]],
    start: list[UpstreamConfig],
) -> None:
    assert plan_upstreams(running, wanted) == (stop, start)


def test_plan_upstreams_unchanged_when_equal_config_is_a_new_object() -> None:
    # A reloaded config is a new object; equal settings must not rebind the listener.
    again = load_upstream({"DestinationName": "db", "LocalBindPort": 9191})
    assert again is not DB
    assert plan_upstreams(_running(DB), (again,)) == ([], [])


# -- load_tls_engine ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "engine"),
    [
        ({}, DEFAULT_TLS_ENGINE),
        ({"CONNECT_PROXY_TLS_ENGINE": ""}, DEFAULT_TLS_ENGINE),
        ({"CONNECT_PROXY_TLS_ENGINE": "ssl"}, "ssl"),
        ({"CONNECT_PROXY_TLS_ENGINE": "openssl"}, "openssl"),
    ],
)
def test_tls_engine_comes_from_the_environment(env: dict[str, str], engine: str) -> None:
    assert load_tls_engine(env) == engine


@pytest.mark.parametrize("value", ["OpenSSL", "stdlib", "boringssl", " ssl", "ssl,openssl"])
def test_unknown_tls_engine_names_the_variable_and_the_choices(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_tls_engine({"CONNECT_PROXY_TLS_ENGINE": value})
    message = str(refused.value)
    assert message.startswith(f"CONNECT_PROXY_TLS_ENGINE={value!r} is not a TLS engine")
    assert "use ssl (" in message and "or openssl (" in message
