"""Loading Consul agent config files (JSON and HCL) into an `AgentConfig`, and running on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.devagent import DevAgent
from proxy.devagent.config import AgentConfig, apply_file, load_files, parse_file
from proxy.errors import ConfigError

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

SNAKE_SERVICE: dict[str, Any] = {
    "name": "web",
    "id": "web",
    "port": 8080,
    "tags": ["v1"],
    "meta": {"some_key": "x", "Version": "1"},
    "check": {"check_id": "web-ttl", "name": "web ttl", "ttl": "30s"},
    "connect": {
        "sidecar_service": {
            "proxy": {
                "config": {"handshake_timeout_ms": 1000, "bind_address": "0.0.0.0"},
                "upstreams": [
                    {
                        "destination_name": "db",
                        "local_bind_port": 9191,
                        "config": {"connect_timeout_ms": 500},
                    }
                ],
            }
        }
    },
}

CAMEL_SERVICE: dict[str, Any] = {
    "Name": "web",
    "ID": "web",
    "Port": 8080,
    "Tags": ["v1"],
    "Meta": {"some_key": "x", "Version": "1"},
    "Check": {"CheckID": "web-ttl", "Name": "web ttl", "TTL": "30s"},
    "Connect": {
        "SidecarService": {
            "Proxy": {
                "Config": {"handshake_timeout_ms": 1000, "bind_address": "0.0.0.0"},
                "Upstreams": [
                    {
                        "DestinationName": "db",
                        "LocalBindPort": 9191,
                        "Config": {"connect_timeout_ms": 500},
                    }
                ],
            }
        }
    },
}

# The canonical decoded form both spellings must give.
DECODED_WEB: dict[str, Any] = {
    "Name": "web",
    "ID": "web",
    "Port": 8080,
    "Tags": ["v1"],
    "Meta": {"some_key": "x", "Version": "1"},
    "Check": {"CheckID": "web-ttl", "Name": "web ttl", "TTL": "30s"},
    "Connect": {
        "SidecarService": {
            "Proxy": {
                "Config": {"handshake_timeout_ms": 1000, "bind_address": "0.0.0.0"},
                "Upstreams": [
                    {
                        "DestinationName": "db",
                        "LocalBindPort": 9191,
                        "Config": {"connect_timeout_ms": 500},
                    }
                ],
            }
        }
    },
}

INTENTIONS_ENTRY: dict[str, Any] = {
    "Kind": "service-intentions",
    "Name": "db",
    "Sources": [
        {"Name": "web", "Action": "allow"},
        {"Name": "*", "Action": "deny"},
    ],
}

FULL_JSON: dict[str, Any] = {
    "datacenter": "dc2",
    "node_name": "node-a",
    "data_dir": "/tmp/consul",
    "ports": {"http": 8600, "grpc": 8602, "sidecar_min_port": 22000, "sidecar_max_port": 22010},
    "acl": {
        "enabled": True,
        "default_policy": "deny",
        "tokens": {"initial_management": "root-secret", "default": "anon", "agent": "agt"},
    },
    "connect": {"ca_config": {"leaf_cert_ttl": "1h"}},
    "service": SNAKE_SERVICE,
    "services": [{"name": "db", "port": 5432}],
    "config_entries": {"bootstrap": [INTENTIONS_ENTRY]},
}

FULL_HCL = """
datacenter = "dc2"
node_name  = "node-a"
data_dir   = "/tmp/consul"

ports {
  http             = 8600
  grpc             = 8602
  sidecar_min_port = 22000
  sidecar_max_port = 22010
}

acl {
  enabled        = true
  default_policy = "deny"
  tokens {
    initial_management = "root-secret"
    default            = "anon"
    agent              = "agt"
  }
}

connect {
  ca_config {
    leaf_cert_ttl = "1h"
  }
}

service {
  name = "web"
  id   = "web"
  port = 8080
  tags = ["v1"]
  meta = {
    some_key = "x"
    Version  = "1"
  }
  check {
    check_id = "web-ttl"
    name     = "web ttl"
    ttl      = "30s"
  }
  connect {
    sidecar_service {
      proxy {
        config {
          handshake_timeout_ms = 1000
          bind_address         = "0.0.0.0"
        }
        upstreams = [
          {
            destination_name = "db"
            local_bind_port  = 9191
            config = {
              connect_timeout_ms = 500
            }
          }
        ]
      }
    }
  }
}

services = [
  {
    name = "db"
    port = 5432
  }
]

config_entries {
  bootstrap = [
    {
      Kind = "service-intentions"
      Name = "db"
      Sources = [
        { Name = "web", Action = "allow" },
        { Name = "*", Action = "deny" },
      ]
    }
  ]
}
"""


def write_json(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def load_error(tmp_path: Path, data: Any, name: str = "agent.json") -> tuple[Path, str]:
    path = write_json(tmp_path, name, data)
    with pytest.raises(ConfigError) as info:
        load_files([path])
    return path, str(info.value)


# -- services ------------------------------------------------------------------------------


def test_snake_case_service_decodes_to_canonical_camel_case(tmp_path: Path) -> None:
    config = load_files([write_json(tmp_path, "web.json", {"service": SNAKE_SERVICE})])

    assert len(config.services) == 1
    svc = config.services[0]
    assert svc == DECODED_WEB
    upstream = svc["Connect"]["SidecarService"]["Proxy"]["Upstreams"][0]
    assert upstream["DestinationName"] == "db"
    assert upstream["LocalBindPort"] == 9191


def test_camel_case_service_decodes_like_snake_case(tmp_path: Path) -> None:
    config = load_files([write_json(tmp_path, "web.json", {"service": CAMEL_SERVICE})])

    assert list(config.services) == [DECODED_WEB]


def test_user_maps_keep_their_keys_unchanged(tmp_path: Path) -> None:
    config = load_files([write_json(tmp_path, "web.json", {"service": SNAKE_SERVICE})])

    svc = config.services[0]
    assert svc["Meta"] == {"some_key": "x", "Version": "1"}
    proxy = svc["Connect"]["SidecarService"]["Proxy"]
    assert proxy["Config"] == {"handshake_timeout_ms": 1000, "bind_address": "0.0.0.0"}
    assert proxy["Upstreams"][0]["Config"] == {"connect_timeout_ms": 500}


def test_services_list_loads_every_definition_in_order(tmp_path: Path) -> None:
    data = {"services": [SNAKE_SERVICE, {"Name": "db", "Port": 5432}, {"name": "cache"}]}
    config = load_files([write_json(tmp_path, "services.json", data)])

    assert [s["Name"] for s in config.services] == ["web", "db", "cache"]
    assert config.services[0] == DECODED_WEB
    assert config.services[1] == {"Name": "db", "Port": 5432}


def test_service_and_services_keys_accumulate_in_one_file(tmp_path: Path) -> None:
    data = {"service": {"name": "web"}, "services": [{"name": "db"}, {"name": "cache"}]}
    config = load_files([write_json(tmp_path, "both.json", data)])

    assert sorted(s["Name"] for s in config.services) == ["cache", "db", "web"]


# -- HCL -----------------------------------------------------------------------------------


def test_hcl_file_gives_the_same_config_as_json(tmp_path: Path) -> None:
    hcl_path = tmp_path / "agent.hcl"
    hcl_path.write_text(FULL_HCL)
    json_path = write_json(tmp_path, "agent.json", FULL_JSON)

    from_hcl = load_files([hcl_path])
    from_json = load_files([json_path])

    assert list(from_hcl.services) == list(from_json.services)
    assert from_hcl.services[0] == DECODED_WEB
    assert list(from_hcl.config_entries) == list(from_json.config_entries) == [INTENTIONS_ENTRY]
    assert from_hcl == from_json


def test_hcl_repeated_service_and_upstream_blocks_become_lists(tmp_path: Path) -> None:
    path = tmp_path / "blocks.hcl"
    path.write_text(
        """
service {
  name = "web"
  port = 8080
  connect {
    sidecar_service {
      proxy {
        upstreams {
          destination_name = "db"
          local_bind_port  = 9191
        }
        upstreams {
          destination_name = "cache"
          local_bind_port  = 9192
        }
      }
    }
  }
}
service {
  name = "db"
  port = 5432
}
"""
    )

    config = load_files([path])

    assert [s["Name"] for s in config.services] == ["web", "db"]
    upstreams = config.services[0]["Connect"]["SidecarService"]["Proxy"]["Upstreams"]
    assert upstreams == [
        {"DestinationName": "db", "LocalBindPort": 9191},
        {"DestinationName": "cache", "LocalBindPort": 9192},
    ]


def test_hcl_is_recognised_by_content_without_a_known_suffix(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_text('datacenter = "dc9"\nservice {\n  name = "web"\n  port = 80\n}\n')

    data = parse_file(path)

    assert data["datacenter"] == "dc9"
    assert load_files([path]).services == ({"Name": "web", "Port": 80},)


def test_json_is_recognised_by_content_without_a_known_suffix(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_text(json.dumps({"datacenter": "dc9"}))

    assert parse_file(path) == {"datacenter": "dc9"}


# -- config entries and agent settings -----------------------------------------------------


def test_config_entries_bootstrap_loads_service_intentions(tmp_path: Path) -> None:
    data = {"config_entries": {"bootstrap": [INTENTIONS_ENTRY]}}
    config = load_files([write_json(tmp_path, "entries.json", data)])

    assert list(config.config_entries) == [INTENTIONS_ENTRY]


def test_agent_settings_map_onto_agent_config_fields(tmp_path: Path) -> None:
    config = load_files([write_json(tmp_path, "agent.json", FULL_JSON)])

    assert config.datacenter == "dc2"
    assert config.node_name == "node-a"
    assert config.http_port == 8600
    assert config.grpc_port == 8602
    assert config.sidecar_min_port == 22000
    assert config.sidecar_max_port == 22010
    assert config.acl_enabled is True
    assert config.acl_default_policy == "deny"
    assert config.acl_initial_management == "root-secret"
    assert config.acl_default_token == "anon"
    assert config.acl_agent_token == "agt"
    assert config.leaf_cert_ttl == 3600.0


def test_addresses_and_client_addr_set_the_http_host(tmp_path: Path) -> None:
    client_addr = load_files([write_json(tmp_path, "a.json", {"client_addr": "127.0.0.2"})])
    addresses = load_files(
        [write_json(tmp_path, "b.json", {"addresses": {"http": "127.0.0.3 127.0.0.4"}})]
    )

    assert client_addr.http_host == "127.0.0.2"
    assert addresses.http_host == "127.0.0.3"


def test_known_unused_consul_keys_are_reported_as_ignored(tmp_path: Path) -> None:
    data = {"data_dir": "/tmp/consul", "server": True, "log_level": "DEBUG", "datacenter": "dc3"}
    config = load_files([write_json(tmp_path, "agent.json", data)])

    assert set(config.ignored_keys) == {"data_dir", "server", "log_level"}
    assert config.datacenter == "dc3"


def test_apply_file_merges_onto_a_given_config(tmp_path: Path) -> None:
    base = AgentConfig(node_name="base", sidecar_check_interval=0.5)

    config = apply_file(base, {"datacenter": "dc4", "service": {"name": "web"}}, "inline")

    assert config.datacenter == "dc4"
    assert config.node_name == "base"
    assert config.sidecar_check_interval == 0.5
    assert config.services == ({"Name": "web"},)


# -- errors --------------------------------------------------------------------------------


def test_unknown_top_level_key_is_an_error_naming_file_and_key(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, {"datacenter": "dc1", "bogus_key": 1})

    assert str(path) in message
    assert "invalid config key bogus_key" in message


def test_unknown_key_in_a_service_is_an_error_with_its_dotted_path(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, {"service": {"name": "web", "prot": 8080}})

    assert str(path) in message
    assert "invalid config key" in message
    assert "service.prot" in message


def test_unknown_key_in_a_services_list_item_names_the_item(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, {"services": [{"name": "a"}, {"name": "b", "x": 1}]})

    assert str(path) in message
    assert "invalid config key services[1].x" in message


def test_unknown_key_deep_in_a_sidecar_upstream_is_an_error(tmp_path: Path) -> None:
    service = {
        "name": "web",
        "connect": {
            "sidecar_service": {
                "proxy": {"upstreams": [{"destination_name": "db", "local_bind_prot": 1}]}
            }
        },
    }
    path, message = load_error(tmp_path, {"service": service})

    assert str(path) in message
    assert "invalid config key" in message
    assert "local_bind_prot" in message


def test_unknown_key_in_an_intentions_entry_is_an_error(tmp_path: Path) -> None:
    entry = {**INTENTIONS_ENTRY, "Bogus": 1}
    path, message = load_error(tmp_path, {"config_entries": {"bootstrap": [entry]}})

    assert str(path) in message
    assert "invalid config key config_entries.bootstrap[0].Bogus" in message


def test_wrong_value_type_in_a_service_is_an_error_naming_the_field(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, {"service": {"name": "web", "port": "8080"}})

    assert str(path) in message
    assert "Port" in message
    assert "cannot unmarshal string" in message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"datacenter": 5}, "datacenter"),
        ({"ports": {"http": "8500"}}, "ports.http"),
        ({"acl": {"tokens": {"agent": 5}}}, "acl.tokens.agent"),
        ({"connect": {"ca_config": {"leaf_cert_ttl": "soon"}}}, "connect.ca_config.leaf_cert_ttl"),
    ],
)
def test_wrong_value_type_of_an_agent_setting_names_file_and_key(
    tmp_path: Path, data: dict[str, Any], key: str
) -> None:
    path, message = load_error(tmp_path, data)

    assert key in message
    assert str(path) in message


def test_invalid_json_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"datacenter": "dc1",')

    with pytest.raises(ConfigError) as info:
        load_files([path])

    assert str(path) in str(info.value)
    assert "JSON" in str(info.value)


def test_invalid_hcl_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.hcl"
    path.write_text("service {\n  name = \n")

    with pytest.raises(ConfigError) as info:
        parse_file(path)

    assert str(path) in str(info.value)
    assert "HCL" in str(info.value)


def test_top_level_that_is_not_an_object_is_an_error(tmp_path: Path) -> None:
    path = write_json(tmp_path, "list.json", [{"datacenter": "dc1"}])

    with pytest.raises(ConfigError) as info:
        parse_file(path)

    assert str(path) in str(info.value)


def test_missing_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"

    with pytest.raises(ConfigError) as info:
        load_files([path])

    assert str(path) in str(info.value)


def test_bad_acl_default_policy_is_an_error(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, {"acl": {"default_policy": "maybe"}})

    assert str(path) in message
    assert "acl.default_policy" in message
    assert "maybe" in message


def test_inverted_sidecar_port_range_is_an_error(tmp_path: Path) -> None:
    data = {"ports": {"sidecar_min_port": 22000, "sidecar_max_port": 21000}}
    path, message = load_error(tmp_path, data)

    assert str(path) in message
    assert "sidecar_min_port" in message


# -- several files -------------------------------------------------------------------------


def test_later_files_win_for_scalars_and_services_accumulate(tmp_path: Path) -> None:
    first = write_json(
        tmp_path,
        "1.json",
        {"datacenter": "dc1", "node_name": "a", "data_dir": "/x", "service": {"name": "web"}},
    )
    second = write_json(
        tmp_path,
        "2.json",
        {"datacenter": "dc2", "services": [{"name": "db"}], "ports": {"http": 8600}},
    )
    third = tmp_path / "3.hcl"
    third.write_text('node_name = "c"\nservice {\n  name = "cache"\n}\n')

    config = load_files([first, second, third])

    assert config.datacenter == "dc2"
    assert config.node_name == "c"
    assert config.http_port == 8600
    assert [s["Name"] for s in config.services] == ["web", "db", "cache"]
    assert config.ignored_keys == ("data_dir",)


def test_an_error_in_a_later_file_names_that_file(tmp_path: Path) -> None:
    good = write_json(tmp_path, "good.json", {"service": {"name": "web"}})
    bad = write_json(tmp_path, "bad.json", {"service": {"name": "db", "colour": "red"}})

    with pytest.raises(ConfigError) as info:
        load_files([good, bad])

    assert str(bad) in str(info.value)
    assert str(good) not in str(info.value)


# -- end to end ----------------------------------------------------------------------------


async def test_agent_started_from_config_serves_sidecar_and_enforces_intention(
    tmp_path: Path,
) -> None:
    data = {
        "node_name": "cfg-node",
        "service": SNAKE_SERVICE,
        "config_entries": {"bootstrap": [INTENTIONS_ENTRY]},
    }
    config = load_files([write_json(tmp_path, "agent.json", data)])
    agent = DevAgent(config)
    try:
        await agent.start("127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=agent.url, timeout=10.0) as client:
            r = await client.get("/v1/agent/service/web-sidecar-proxy")
            assert r.status_code == 200, r.text
            sidecar = r.json()
            assert sidecar["Kind"] == "connect-proxy"
            assert sidecar["Service"] == "web-sidecar-proxy"
            assert sidecar["Proxy"]["DestinationServiceName"] == "web"
            assert sidecar["Proxy"]["DestinationServiceID"] == "web"
            assert sidecar["Proxy"]["LocalServiceAddress"] == "127.0.0.1"
            assert sidecar["Proxy"]["LocalServicePort"] == 8080
            assert sidecar["Proxy"]["Config"] == {
                "handshake_timeout_ms": 1000,
                "bind_address": "0.0.0.0",
            }
            upstream = sidecar["Proxy"]["Upstreams"][0]
            assert upstream["DestinationName"] == "db"
            assert upstream["LocalBindPort"] == 9191
            assert config.sidecar_min_port <= sidecar["Port"] <= config.sidecar_max_port

            r = await client.get("/v1/agent/connect/ca/roots")
            assert r.status_code == 200, r.text
            trust_domain = r.json()["TrustDomain"]

            async def authorize(source: str) -> dict[str, Any]:
                uri = f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{source}"
                resp = await client.post(
                    "/v1/agent/connect/authorize",
                    json={"Target": "db", "ClientCertURI": uri},
                )
                assert resp.status_code == 200, resp.text
                return dict(resp.json())

            allowed = await authorize("web")
            denied = await authorize("api")
            assert allowed["Authorized"] is True, allowed
            assert denied["Authorized"] is False, denied
            assert denied["Reason"]
    finally:
        await agent.close()


def test_session_ttl_min() -> None:
    assert AgentConfig().session_ttl_min == 10.0
    assert apply_file(AgentConfig(), {"session_ttl_min": "250ms"}, "a.json").session_ttl_min == 0.25
    with pytest.raises(ConfigError, match="session_ttl_min"):
        apply_file(AgentConfig(), {"session_ttl_min": "soon"}, "a.json")
