"""The `connect-proxy` command line: Consul's flags, environment variables and messages.

Covers `parse_proxy_args` (Consul's `command/connect/proxy/proxy.go`, and the
checks of its `flag_upstreams_test.go` and `proxy_test.go`), the HTTP options of the agent client (1.0),
the legacy managed-proxy body (1.10) and `main` as a function (`make_http_client` and
`explain` are in test_agent.py). Environments are plain dicts; nothing here reads `os.environ`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import __version__
from proxy.config import (
    ProxyConfig,
    PublicListenerConfig,
    UpstreamConfig,
    load_managed_proxy,
)
from proxy.devagent import DevAgent
from proxy.errors import ConfigError
from proxy.goflags import FlagError, HelpRequested
from proxy.httpflags import HTTPOptions, load_http_options
from proxy.main import main
from proxy.proxyargs import ProxyOptions, parse_proxy_args
from tests.conftest import register


def parse(*args: str, env: dict[str, str] | None = None) -> ProxyOptions:
    return parse_proxy_args(list(args), env or {})


def upstreams_of(*args: str) -> tuple[UpstreamConfig, ...]:
    options = parse("-service", "web", *args)
    assert options.static is not None
    return options.static.upstreams


# -- -upstream (cmd/flag_upstreams_test.go) -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("foo", 'Upstream value should be name:addr in "foo"'),
        ("db:hello", 'strconv.ParseInt: parsing "hello": invalid syntax'),
        ("db:127.0.0.1:8181:foo", 'strconv.ParseInt: parsing "8181:foo": invalid syntax'),
        ("db:", 'strconv.ParseInt: parsing "": invalid syntax'),
        ("db:08", "invalid syntax"),  # a leading 0 means octal, and 8 is no octal digit
        ("db:0x", "invalid syntax"),
        ("db:1__000", "invalid syntax"),
        ("db:_1000", "invalid syntax"),
        ("db:1000_", "invalid syntax"),
        ("db:8181.0", "invalid syntax"),
        ("db.bad:8181", "Upstream type must be blank, 'service', or 'query'. Got: \"bad\""),
        ("db.Query:8181", "Upstream type must be blank, 'service', or 'query'. Got: \"Query\""),
        ("db:99999999999999999999", "value out of range"),
    ],
)
def test_bad_upstream_flag_fails_with_consuls_message(value: str, fragment: str) -> None:
    with pytest.raises(FlagError) as info:
        parse("-service", "web", "-upstream", value)
    text = str(info.value)
    assert text.startswith(f'invalid value "{value}" for flag -upstream: ')
    assert fragment in text


@pytest.mark.parametrize("value", ["db:0", "db:65536", "db:70000", "db:-1", "db:0x10000"])
def test_upstream_port_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(FlagError, match=r'^invalid value "db:[^"]*" for flag -upstream: '):
        parse("-service", "web", "-upstream", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("db:8181", UpstreamConfig("db", 8181)),
        ("db.:8181", UpstreamConfig("db", 8181)),
        ("db.service:8181", UpstreamConfig("db", 8181)),
        ("db.query:8181", UpstreamConfig("db", 8181, destination_type="prepared_query")),
        ("db:127.0.0.55:8181", UpstreamConfig("db", 8181, local_bind_address="127.0.0.55")),
        ("db::8181", UpstreamConfig("db", 8181)),  # empty host: defaulted to 127.0.0.1
        (
            "db.query:10.0.0.1:9191",
            UpstreamConfig("db", 9191, "prepared_query", local_bind_address="10.0.0.1"),
        ),
        ("db:0x1f90", UpstreamConfig("db", 8080)),
        ("db:0X1F90", UpstreamConfig("db", 8080)),
        ("db:070000", UpstreamConfig("db", 0o70000)),  # 28672: a leading 0 is octal in Go
        ("db:0o17", UpstreamConfig("db", 15)),
        ("db:0b1010", UpstreamConfig("db", 10)),
        ("db:+8181", UpstreamConfig("db", 8181)),
        ("db:65535", UpstreamConfig("db", 65535)),
    ],
)
def test_upstream_flag_shapes(value: str, expected: UpstreamConfig) -> None:
    assert upstreams_of("-upstream", value) == (expected,)


def test_upstream_defaults_match_consuls_upstream_defaults() -> None:
    (up,) = upstreams_of("-upstream", "db:8181")
    assert up.destination_type == "service"
    assert up.destination_namespace == "default"
    assert up.destination_partition == "default"
    assert up.local_bind_address == "127.0.0.1"
    assert up.datacenter == ""
    assert up.connect_timeout == 10.0


def test_repeated_upstream_name_overrides_the_earlier_one() -> None:
    assert upstreams_of("-upstream", "db:8181", "-upstream", "db:8282") == (
        UpstreamConfig("db", 8282),
    )


def test_upstream_of_a_repeated_name_can_change_its_type() -> None:
    assert upstreams_of("-upstream", "db:8181", "-upstream", "db.query:8181") == (
        UpstreamConfig("db", 8181, "prepared_query"),
    )


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("db: 8181", id="leading-space"),
        pytest.param("db:8181 ", id="trailing-space"),
        pytest.param("db:\uff18\uff11\uff18\uff11", id="fullwidth-digits"),
        pytest.param("db:--8181", id="double-minus"),
        pytest.param("db:+-8181", id="plus-minus"),
        pytest.param("db:8181x", id="trailing-letter"),
    ],
)
def test_upstream_port_that_go_cannot_parse_is_invalid_syntax(value: str) -> None:
    with pytest.raises(FlagError, match="invalid syntax"):
        parse("-service", "web", "-upstream", value)


@pytest.mark.parametrize(
    ("value", "port"),
    [
        pytest.param("db:8_181", 8181, id="decimal"),
        pytest.param("db:0x_1f90", 8080, id="after-0x"),
        pytest.param("db:0_700", 0o700, id="octal"),
        pytest.param("db:0b1_0", 2, id="binary"),
        pytest.param("db:0x1f_90", 8080, id="hex"),
    ],
)
def test_upstream_port_with_go_digit_separators_parses(value: str, port: int) -> None:
    assert upstreams_of("-upstream", value) == (UpstreamConfig("db", port),)


# -- flags mode (cmd/proxy_test.go) -------------------------------------------------------


def test_service_alone_is_flags_mode_without_listener_or_upstreams() -> None:
    options = parse("-service", "web")
    assert options.mode == "flags"
    assert options.static == ProxyConfig(service="web", public_listener=None, upstreams=())
    assert options.proxy_id == "" and options.sidecar_for == "" and not options.legacy
    assert not options.register


def test_upstreams_come_out_sorted_by_name() -> None:
    assert upstreams_of("-upstream", "db:8181", "-upstream", "cache:9191") == (
        UpstreamConfig("cache", 9191),
        UpstreamConfig("db", 8181),
    )


def test_service_addr_without_listen_is_ignored() -> None:
    options = parse("-service", "web", "-service-addr", "127.0.0.1:1234")
    assert options.static is not None and options.static.public_listener is None


def test_listen_with_empty_host_binds_all_interfaces() -> None:
    options = parse("-service", "web", "-listen", ":4567", "-service-addr", "127.0.0.1:1234")
    assert options.static is not None
    assert options.static.public_listener == PublicListenerConfig(
        bind_address="0.0.0.0",
        bind_port=4567,
        local_service_host="127.0.0.1",
        local_service_port=1234,
    )
    assert options.listen == ":4567"


def test_listen_keeps_an_explicit_host() -> None:
    options = parse("-service", "web", "-listen", "127.0.0.2:4567", "-service-addr", "[::1]:80")
    assert options.static is not None and options.static.public_listener is not None
    assert options.static.public_listener.bind_address == "127.0.0.2"
    assert options.static.public_listener.local_service_address == "[::1]:80"


def test_public_listener_timeouts_have_consuls_defaults() -> None:
    options = parse("-service", "web", "-listen", ":1", "-service-addr", "127.0.0.1:2")
    assert options.static is not None and options.static.public_listener is not None
    assert options.static.public_listener.local_connect_timeout == 1.0
    assert options.static.public_listener.handshake_timeout == 10.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-service", "web", "-listen", ":4567"],
            "-service-addr must be specified with -listen so the proxy knows the backend "
            "service address.",
        ),
        ([], "-service or -proxy-id must be specified so that proxy can configure itself."),
        (
            ["-log-level", "DEBUG"],
            "-service or -proxy-id must be specified so that proxy can configure itself.",
        ),
        (
            ["-register"],
            "-service or -proxy-id must be specified so that proxy can configure itself.",
        ),
        (
            ["-service", "web", "-register"],
            "-register may only be specified with -service and -listen",
        ),
        (
            ["-proxy-id", "p", "-register"],
            "-register may only be specified with -service and -listen",
        ),
        (["-service", "web", "extra"], "Should have no non-flag arguments."),
        (["extra"], "Should have no non-flag arguments."),
        (["-service", "web", "--", "-listen", ":1"], "Should have no non-flag arguments."),
    ],
)
def test_refused_combinations_have_consuls_exact_text(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(*args)
    assert str(info.value) == message


def test_register_with_service_and_listen_is_accepted() -> None:
    options = parse(
        "-service",
        "web",
        "-listen",
        ":0",
        "-service-addr",
        "127.0.0.1:8080",
        "-register",
        "-register-id",
        "two",
    )
    assert options.register and options.register_id == "two"


@pytest.mark.parametrize("listen", ["4567", "127.0.0.1", "host:port", ":65536", "::1:80"])
def test_unparseable_listen_address_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError, match="-listen"):
        parse("-service", "web", "-listen", listen, "-service-addr", "127.0.0.1:1")


def test_flag_errors_surface_as_flag_error() -> None:
    with pytest.raises(FlagError, match=r"^flag provided but not defined: -nope$"):
        parse("-service", "web", "-nope")
    with pytest.raises(FlagError, match=r"^flag needs an argument: -service$"):
        parse("-service")
    with pytest.raises(FlagError, match=r'^invalid boolean value "yes" for -register: '):
        parse("-register=yes")


def test_help_flag_raises_help_requested() -> None:
    with pytest.raises(HelpRequested):
        parse("-service", "web", "-help")


def test_logging_and_drain_defaults() -> None:
    options = parse("-service", "web")
    assert options.log_level == "INFO"
    assert options.log_json is False
    assert options.drain_timeout == 10.0


def test_logging_and_drain_flags() -> None:
    options = parse(
        "-service", "web", "-log-level", "debug", "-log-json", "-drain-timeout", "1500ms"
    )
    assert options.log_level == "debug"
    assert options.log_json is True
    assert options.drain_timeout == pytest.approx(1.5)


def test_bad_drain_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="-drain-timeout"):
        parse("-service", "web", "-drain-timeout", "soon")


def test_pprof_addr_is_accepted_for_compatibility() -> None:
    assert parse("-service", "web", "-pprof-addr", "127.0.0.1:6060").mode == "flags"


# -- mode precedence ----------------------------------------------------------------------


def test_proxy_id_beats_sidecar_for_and_service() -> None:
    options = parse("-proxy-id", "p1", "-sidecar-for", "web", "-service", "web")
    assert options.mode == "agent"
    assert options.proxy_id == "p1"
    assert options.static is None


def test_sidecar_for_beats_service() -> None:
    options = parse("-sidecar-for", "web", "-service", "api")
    assert options.mode == "sidecar"
    assert options.sidecar_for == "web"
    assert options.proxy_id == ""
    assert options.static is None


def test_proxy_id_mode_ignores_listen_without_service_addr() -> None:
    # The flags-mode checks apply only in flags mode, as in Consul.
    assert parse("-proxy-id", "p1", "-service", "web", "-listen", ":1").mode == "agent"


def test_env_proxy_id_is_used_when_the_flag_is_empty() -> None:
    options = parse(env={"CONNECT_PROXY_ID": "from-env"})
    assert options.mode == "agent" and options.proxy_id == "from-env"
    assert not options.legacy


def test_flag_proxy_id_beats_env_proxy_id() -> None:
    options = parse("-proxy-id", "from-flag", env={"CONNECT_PROXY_ID": "from-env"})
    assert options.proxy_id == "from-flag"


def test_env_proxy_id_beats_sidecar_for_and_service() -> None:
    options = parse("-sidecar-for", "web", "-service", "web", env={"CONNECT_PROXY_ID": "p2"})
    assert options.mode == "agent" and options.proxy_id == "p2"


def test_consul_proxy_id_is_an_alias_of_connect_proxy_id() -> None:
    options = parse(env={"CONSUL_PROXY_ID": "alias"})
    assert options.mode == "agent" and options.proxy_id == "alias"


def test_connect_proxy_id_wins_over_consul_proxy_id() -> None:
    options = parse(env={"CONSUL_PROXY_ID": "alias", "CONNECT_PROXY_ID": "real"})
    assert options.proxy_id == "real"


def test_empty_env_proxy_id_falls_through_to_flags_mode() -> None:
    options = parse("-service", "web", env={"CONNECT_PROXY_ID": ""})
    assert options.mode == "flags"


def test_env_sidecar_for_is_used_when_the_flag_is_empty() -> None:
    options = parse(env={"CONNECT_SIDECAR_FOR": "web"})
    assert options.mode == "sidecar" and options.sidecar_for == "web"


def test_flag_sidecar_for_beats_env_sidecar_for() -> None:
    options = parse("-sidecar-for", "api", env={"CONNECT_SIDECAR_FOR": "web"})
    assert options.sidecar_for == "api"


def test_env_sidecar_for_beats_service() -> None:
    options = parse("-service", "api", env={"CONNECT_SIDECAR_FOR": "web"})
    assert options.mode == "sidecar"


def test_env_proxy_id_with_proxy_token_is_a_legacy_managed_proxy() -> None:
    options = parse(env={"CONNECT_PROXY_ID": "web-proxy", "CONNECT_PROXY_TOKEN": "tok"})
    assert options.mode == "agent"
    assert options.proxy_id == "web-proxy"
    assert options.legacy is True
    assert options.http.token == "tok"


def test_proxy_id_flag_with_proxy_token_is_not_legacy() -> None:
    options = parse("-proxy-id", "web-proxy", env={"CONNECT_PROXY_TOKEN": "tok"})
    assert options.mode == "agent"
    assert options.legacy is False


def test_proxy_token_without_proxy_id_is_not_legacy() -> None:
    options = parse("-sidecar-for", "web", env={"CONNECT_PROXY_TOKEN": "tok"})
    assert options.mode == "sidecar" and options.legacy is False


# -- HTTP options (Consul's api/api.go) ------------------------------------------------------


def test_http_defaults() -> None:
    http = load_http_options({}, {})
    assert http == HTTPOptions()
    assert (http.scheme, http.address, http.path_prefix, http.token) == (
        "http",
        "127.0.0.1:8500",
        "",
        "",
    )
    assert http.tls_skip_verify is False and http.basic_auth is None
    assert http.display_address == "http://127.0.0.1:8500"


def test_consul_http_addr_is_used_when_the_flag_is_empty() -> None:
    http = load_http_options({"http-addr": ""}, {"CONSUL_HTTP_ADDR": "10.1.2.3:8500"})
    assert http.address == "10.1.2.3:8500"


def test_http_addr_flag_beats_consul_http_addr() -> None:
    http = load_http_options({"http-addr": "127.0.0.9:8500"}, {"CONSUL_HTTP_ADDR": "10.1.2.3:8500"})
    assert http.address == "127.0.0.9:8500"


@pytest.mark.parametrize(
    ("addr", "scheme", "address", "prefix"),
    [
        ("h:8500", "http", "h:8500", ""),
        ("http://h:8500", "http", "h:8500", ""),
        ("https://h:8501", "https", "h:8501", ""),
        ("https://h:8501/prefix", "https", "h:8501", "/prefix"),
        ("http://h:8500/a/b", "http", "h:8500", "/a/b"),
        ("unix:///tmp/consul.sock", "unix", "/tmp/consul.sock", ""),
        ("[::1]:8500", "http", "[::1]:8500", ""),
    ],
)
def test_http_addr_scheme_and_prefix(addr: str, scheme: str, address: str, prefix: str) -> None:
    http = load_http_options({}, {"CONSUL_HTTP_ADDR": addr})
    assert (http.scheme, http.address, http.path_prefix) == (scheme, address, prefix)


def test_unix_display_address() -> None:
    http = load_http_options({}, {"CONSUL_HTTP_ADDR": "unix:///tmp/consul.sock"})
    assert http.display_address == "unix:///tmp/consul.sock"


@pytest.mark.parametrize("scheme", ["ftp", "tcp", "HTTP", "unixgram"])
def test_unknown_scheme_is_refused_with_consuls_text(scheme: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_http_options({"http-addr": f"{scheme}://x"}, {})
    assert str(info.value) == f"Unknown protocol scheme: {scheme}"


@pytest.mark.parametrize(("ssl", "scheme"), [("true", "https"), ("1", "https"), ("false", "http")])
def test_consul_http_ssl_sets_the_scheme_of_a_scheme_less_address(ssl: str, scheme: str) -> None:
    http = load_http_options({}, {"CONSUL_HTTP_SSL": ssl, "CONSUL_HTTP_ADDR": "h:8501"})
    assert http.scheme == scheme


def test_consul_http_ssl_applies_to_the_default_address() -> None:
    http = load_http_options({}, {"CONSUL_HTTP_SSL": "true"})
    assert (http.scheme, http.address) == ("https", "127.0.0.1:8500")


def test_https_address_is_tls_even_when_consul_http_ssl_is_false() -> None:
    http = load_http_options({}, {"CONSUL_HTTP_SSL": "false", "CONSUL_HTTP_ADDR": "https://h:1"})
    assert http.scheme == "https"


def test_http_scheme_does_not_undo_consul_http_ssl() -> None:
    http = load_http_options({}, {"CONSUL_HTTP_SSL": "true", "CONSUL_HTTP_ADDR": "http://h:8501"})
    assert http.scheme == "https"


def _token_file(tmp_path: Path, name: str, token: str) -> str:
    path = tmp_path / name
    path.write_text(f"  \n\t{token}\r\n  \n", encoding="utf-8")
    return str(path)


def test_token_precedence_is_consuls(tmp_path: Path) -> None:
    flag_file = _token_file(tmp_path, "flag.token", "from-flag-file")
    env_file = _token_file(tmp_path, "env.token", "from-env-file")
    values: dict[str, Any] = {"token-file": flag_file, "token": "from-flag"}
    env = {
        "CONSUL_HTTP_TOKEN_FILE": env_file,
        "CONSUL_HTTP_TOKEN": "from-env",
        "CONNECT_PROXY_TOKEN": "from-proxy-env",
    }
    assert load_http_options(values, env).token == "from-flag-file"
    del values["token-file"]
    assert load_http_options(values, env).token == "from-flag"
    del values["token"]
    # Consul 1.2-1.5 put CONNECT_PROXY_TOKEN into the -token flag when it was empty.
    assert load_http_options(values, env).token == "from-proxy-env"
    del env["CONNECT_PROXY_TOKEN"]
    assert load_http_options(values, env).token == "from-env-file"
    del env["CONSUL_HTTP_TOKEN_FILE"]
    assert load_http_options(values, env).token == "from-env"
    del env["CONSUL_HTTP_TOKEN"]
    assert load_http_options(values, env).token == ""


def test_token_precedence_through_the_command_line(tmp_path: Path) -> None:
    flag_file = _token_file(tmp_path, "flag.token", "file-token")
    env = {"CONSUL_HTTP_TOKEN": "env-token"}
    assert parse("-service", "web", env=env).http.token == "env-token"
    assert parse("-service", "web", "-token", "flag-token", env=env).http.token == "flag-token"
    options = parse("-service", "web", "-token", "flag-token", "-token-file", flag_file, env=env)
    assert options.http.token == "file-token"


@pytest.mark.parametrize("other", ["CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"])
def test_connect_proxy_token_acts_as_the_token_flag(tmp_path: Path, other: str) -> None:
    value = "other-token"
    if other == "CONSUL_HTTP_TOKEN_FILE":
        value = _token_file(tmp_path, "env.token", "other-token")
    env = {other: value, "CONNECT_PROXY_TOKEN": "proxy-token"}
    assert load_http_options({}, env).token == "proxy-token"


@pytest.mark.parametrize("source", ["flag", "env"])
def test_missing_token_file_is_a_config_error(tmp_path: Path, source: str) -> None:
    missing = str(tmp_path / "no-such.token")
    values = {"token-file": missing} if source == "flag" else {}
    env = {"CONSUL_HTTP_TOKEN_FILE": missing} if source == "env" else {}
    with pytest.raises(ConfigError) as info:
        load_http_options(values, env)
    assert str(info.value).startswith("Error loading token file")
    assert missing in str(info.value)


def test_missing_token_file_fails_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^Error loading token file"):
        parse("-service", "web", "-token-file", str(tmp_path / "nope"))


def test_tls_environment_maps_to_fields() -> None:
    http = load_http_options(
        {},
        {
            "CONSUL_CACERT": "/ca.pem",
            "CONSUL_CAPATH": "/cas",
            "CONSUL_CLIENT_CERT": "/client.pem",
            "CONSUL_CLIENT_KEY": "/client.key",
            "CONSUL_TLS_SERVER_NAME": "consul.example:8501",
            "CONSUL_HTTP_SSL_VERIFY": "false",
            "CONSUL_HTTP_AUTH": "user:pa:ss",
        },
    )
    assert http.ca_file == "/ca.pem"
    assert http.ca_path == "/cas"
    assert http.client_cert == "/client.pem"
    assert http.client_key == "/client.key"
    assert http.tls_server_name == "consul.example"
    assert http.tls_skip_verify is True
    assert http.basic_auth == ("user", "pa:ss")


def test_tls_flags_beat_the_environment() -> None:
    options = parse(
        "-service",
        "web",
        "-ca-file",
        "/f-ca.pem",
        "-ca-path",
        "/f-cas",
        "-client-cert",
        "/f-client.pem",
        "-client-key",
        "/f-client.key",
        "-tls-server-name",
        "flag.example",
        env={
            "CONSUL_CACERT": "/ca.pem",
            "CONSUL_CAPATH": "/cas",
            "CONSUL_CLIENT_CERT": "/client.pem",
            "CONSUL_CLIENT_KEY": "/client.key",
            "CONSUL_TLS_SERVER_NAME": "env.example",
        },
    )
    http = options.http
    assert (http.ca_file, http.ca_path, http.client_cert, http.client_key) == (
        "/f-ca.pem",
        "/f-cas",
        "/f-client.pem",
        "/f-client.key",
    )
    assert http.tls_server_name == "flag.example"


@pytest.mark.parametrize(("verify", "skip"), [("true", False), ("1", False), ("0", True)])
def test_consul_http_ssl_verify(verify: str, skip: bool) -> None:
    assert load_http_options({}, {"CONSUL_HTTP_SSL_VERIFY": verify}).tls_skip_verify is skip


def test_consul_http_auth_without_a_colon_is_a_user_with_no_password() -> None:
    assert load_http_options({}, {"CONSUL_HTTP_AUTH": "user"}).basic_auth == ("user", "")


def test_tls_server_name_without_port_is_kept() -> None:
    http = load_http_options({}, {"CONSUL_TLS_SERVER_NAME": "consul.example"})
    assert http.tls_server_name == "consul.example"


def test_tls_server_name_ipv6_port_is_stripped() -> None:
    http = load_http_options({}, {"CONSUL_TLS_SERVER_NAME": "[::1]:8501"})
    assert http.tls_server_name == "::1"


def test_datacenter_and_stale_flags() -> None:
    options = parse("-service", "web", "-datacenter", "dc2", "-stale")
    assert options.http.datacenter == "dc2"
    assert options.http.stale is True
    plain = parse("-service", "web")
    assert plain.http.datacenter == "" and plain.http.stale is False
    assert parse("-service", "web", "-stale=false").http.stale is False


def test_http_flags_through_the_command_line() -> None:
    options = parse(
        "-service", "web", "-http-addr", "https://h:8501/pfx", env={"CONSUL_HTTP_ADDR": "x:1"}
    )
    assert (options.http.scheme, options.http.address, options.http.path_prefix) == (
        "https",
        "h:8501",
        "/pfx",
    )


def test_unknown_scheme_fails_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^Unknown protocol scheme: ftp$"):
        parse("-service", "web", env={"CONSUL_HTTP_ADDR": "ftp://x"})


# -- secrets stay out of reprs ------------------------------------------------------------


def test_token_and_password_never_appear_in_reprs(tmp_path: Path) -> None:
    token_file = _token_file(tmp_path, "t", "s3cr3t-file-token")
    env = {"CONSUL_HTTP_AUTH": "user:hunter2-pass"}
    for args in (
        ["-service", "web", "-token", "s3cr3t-flag-token"],
        ["-service", "web", "-token-file", token_file],
        ["-service", "web", "-listen", ":1", "-service-addr", "127.0.0.1:2"],
    ):
        options = parse(*args, env={**env, "CONSUL_HTTP_TOKEN": "s3cr3t-env-token"})
        assert options.http.token.startswith("s3cr3t")
        for text in (repr(options), repr(options.http), str(options), str(options.http)):
            assert "s3cr3t" not in text
            assert "hunter2" not in text


# -- main / proxy_main --------------------------------------------------------------------

_PROXY_ENV = (
    "CONNECT_PROXY_ID",
    "CONSUL_PROXY_ID",
    "CONNECT_PROXY_TOKEN",
    "CONNECT_SIDECAR_FOR",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` reads os.environ: keep a stray proxy ID from making it serve."""
    for name in _PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


def run_main(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("word", ["version", "-version", "--version"])
def test_main_version_prints_the_version(
    clean_env: None, capsys: pytest.CaptureFixture[str], word: str
) -> None:
    code, out, err = run_main([word], capsys)
    assert code == 0
    assert out == f"connect-proxy {__version__}\n"
    assert err == ""


@pytest.mark.parametrize("flag", ["-help", "-h", "--help"])
def test_main_help_prints_usage_and_exits_0(
    clean_env: None, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    code, out, err = run_main([flag], capsys)
    assert code == 0
    assert "Usage: connect-proxy" in out
    for name in ("-sidecar-for", "-proxy-id", "-service", "-upstream", "-listen", "-token"):
        assert name in out
    assert err == ""


def test_help_text_contains_no_tabs(clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_main(["-help"], capsys)
    assert "\t" not in out


def test_main_unknown_flag_exits_1_with_gos_message(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["-foo"], capsys)
    assert code == 1
    assert err.splitlines()[0] == "flag provided but not defined: -foo"
    assert "Usage: connect-proxy" in err
    assert out == ""


def test_main_bad_upstream_exits_1(clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["-service", "web", "-upstream", "foo"], capsys)
    assert code == 1
    assert err.splitlines()[0] == (
        'invalid value "foo" for flag -upstream: Upstream value should be name:addr in "foo"'
    )


def test_main_without_a_mode_exits_1(clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main([], capsys)
    assert code == 1
    assert "-service or -proxy-id must be specified so that proxy can configure itself." in err
    assert out == ""


def test_main_non_flag_argument_exits_1(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["-service", "web", "extra"], capsys)
    assert code == 1
    assert "Should have no non-flag arguments." in err


def test_main_never_prints_the_token(clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        ["-service", "web", "-token", "s3cr3t-value", "-listen", ":1"], capsys
    )
    assert code == 1
    assert "-service-addr must be specified with -listen" in err
    assert "s3cr3t-value" not in out
    assert "s3cr3t-value" not in err


def test_main_never_prints_the_token_from_the_environment(
    clean_env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cr3t-env-value")
    code, out, err = run_main(["-service", "web", "-register"], capsys)
    assert code == 1
    assert "-register may only be specified with -service and -listen" in err
    assert "s3cr3t-env-value" not in out + err


# -- legacy managed-proxy body (agent/agent_endpoint.go of Consul 1.5) --------------------

WEB_WITH_SIDECAR = {
    "Name": "web",
    "Port": 8080,
    "Connect": {
        "SidecarService": {
            "Proxy": {
                "Config": {"local_connect_timeout_ms": 500},
                "Upstreams": [
                    {"DestinationName": "db", "LocalBindPort": 9191},
                    {
                        "DestinationType": "prepared_query",
                        "DestinationName": "q",
                        "Datacenter": "dc2",
                        "LocalBindAddress": "127.0.0.2",
                        "LocalBindPort": 9192,
                        "Config": {"connect_timeout_ms": 2500},
                    },
                ],
            }
        }
    },
}

EXPECTED_MANAGED = ProxyConfig(
    service="web",
    public_listener=PublicListenerConfig(
        bind_address="127.0.0.1",
        bind_port=21000,
        local_service_host="127.0.0.1",
        local_service_port=8080,
        local_connect_timeout=0.5,
        handshake_timeout=10.0,
    ),
    upstreams=(
        UpstreamConfig("db", 9191),
        UpstreamConfig(
            "q",
            9192,
            destination_type="prepared_query",
            datacenter="dc2",
            local_bind_address="127.0.0.2",
            connect_timeout=2.5,
            config={"connect_timeout_ms": 2500},
        ),
    ),
)


async def _managed_body(agent: DevAgent, client: httpx.AsyncClient) -> dict[str, Any]:
    await register(client, WEB_WITH_SIDECAR)
    r = await client.get("/v1/agent/connect/proxy/web-sidecar-proxy")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_managed_proxy_body_from_the_agent_becomes_a_proxy_config(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    body = await _managed_body(agent, client)
    assert body["TargetServiceName"] == "web"
    assert load_managed_proxy(body) == EXPECTED_MANAGED


async def test_managed_proxy_consul_1_2_body_with_snake_case_upstreams_in_config(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    body = await _managed_body(agent, client)
    del body["Upstreams"]  # 1.2's api.ConnectProxyConfig had no Upstreams field
    body["Config"] = {
        **body["Config"],
        "upstreams": [
            {"destination_name": "db", "local_bind_port": 9191},
            {
                "destination_name": "q",
                "destination_type": "prepared_query",
                "destination_datacenter": "dc2",
                "local_bind_address": "127.0.0.2",
                "local_bind_port": 9192,
                "connect_timeout_ms": 2500,
            },
        ],
    }
    assert load_managed_proxy(body) == EXPECTED_MANAGED


def test_managed_proxy_1_2_upstream_namespace_is_carried() -> None:
    cfg = load_managed_proxy(
        {
            "TargetServiceName": "web",
            "Config": {
                "upstreams": [
                    {
                        "destination_name": "db",
                        "destination_namespace": "ns1",
                        "local_bind_port": 1234.0,
                    }
                ]
            },
        }
    )
    assert cfg.public_listener is None
    assert cfg.upstreams == (UpstreamConfig("db", 1234, destination_namespace="ns1"),)


def test_managed_proxy_without_bind_port_has_no_public_listener() -> None:
    cfg = load_managed_proxy({"TargetServiceName": "web", "Config": {}, "Upstreams": []})
    assert cfg == ProxyConfig(service="web")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"Config": {}}, "TargetServiceName"),
        ({"TargetServiceName": "web", "Config": ["bind_port"]}, "Config"),
        ({"TargetServiceName": "web", "Config": {"bind_port": 70000}}, "bind_port"),
        ({"TargetServiceName": "web", "Config": {"bind_port": "21000"}}, "bind_port"),
        ({"TargetServiceName": "web", "Config": {"bind_port": 21000}}, "local_service_address"),
        (
            {
                "TargetServiceName": "web",
                "Config": {"bind_port": 21000, "local_service_address": "nope"},
            },
            "local_service_address",
        ),
        (
            {"TargetServiceName": "web", "Config": {"upstreams": [{"destination_name": "db"}]}},
            "local_bind_port",
        ),
    ],
)
def test_managed_proxy_body_that_cannot_be_used_is_a_config_error(
    body: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_managed_proxy(body)


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:port", "127.0.0.1:70000", "a:b:1"])
def test_admin_bind_must_be_host_port(value: str) -> None:
    with pytest.raises(ConfigError, match="-admin-bind"):
        parse_proxy_args(["-service", "web", "-admin-bind", value], {})
    with pytest.raises(ConfigError, match="-admin-bind"):
        parse_proxy_args(["-service", "web"], {"CONNECT_PROXY_ADMIN_BIND": value})


def test_admin_bind_flag_wins_over_the_environment_and_is_off_by_default() -> None:
    env = {"CONNECT_PROXY_ADMIN_BIND": "127.0.0.1:19001"}
    assert parse_proxy_args(["-service", "web"], {}).admin_bind == ""
    assert parse_proxy_args(["-service", "web"], env).admin_bind == "127.0.0.1:19001"
    flagged = parse_proxy_args(["-service", "web", "-admin-bind", ":19002"], env)
    assert flagged.admin_bind == ":19002"


def test_metrics_switches() -> None:
    options = parse_proxy_args(["-service", "web", "-access-log=false"], {})
    assert (options.access_log, options.metrics) == (False, True)
    options = parse_proxy_args(["-service", "web"], {"CONNECT_PROXY_METRICS": "off"})
    assert (options.access_log, options.metrics) == (True, False)
    assert options.settings()["access_log"] is False
