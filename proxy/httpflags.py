"""How to reach the agent: Consul's HTTP client flags and `CONSUL_*` environment variables.

Every command that talks to an agent (`connect-proxy`, `envoy`) takes the same flags as
Consul's commands (`-http-addr`, `-token`, `-token-file`, `-ca-file`, ...) with the same
precedence (flag, then environment, then default) and turns them into one `HTTPOptions`.

Rule 1: the only I/O is reading a token file; a file that cannot be read is a ConfigError
naming it. The token never appears in a repr or a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import ConfigError
from proxy.goflags import FlagSet, parse_bool


def add_http_flags(fs: FlagSet) -> None:
    """Consul's HTTP client flags (`-http-addr`, `-token`, ...), shared by the commands."""
    fs.string(
        "http-addr", "", "The `address` and port of the Consul HTTP agent (CONSUL_HTTP_ADDR)."
    )
    fs.string("token", "", "ACL token to use in the request (CONSUL_HTTP_TOKEN).")
    fs.string("token-file", "", "File containing the ACL token (CONSUL_HTTP_TOKEN_FILE).")
    fs.string("ca-file", "", "Path to a CA file for TLS to Consul (CONSUL_CACERT).")
    fs.string("ca-path", "", "Path to a directory of CA certificates (CONSUL_CAPATH).")
    fs.string("client-cert", "", "Client certificate for TLS to Consul (CONSUL_CLIENT_CERT).")
    fs.string("client-key", "", "Client key for TLS to Consul (CONSUL_CLIENT_KEY).")
    fs.string("tls-server-name", "", "SNI host name for TLS to Consul (CONSUL_TLS_SERVER_NAME).")
    fs.string("datacenter", "", "Name of the datacenter to query.")
    fs.boolean("stale", False, "Permit any Consul server to answer.")


@dataclass(frozen=True, slots=True)
class HTTPOptions:
    """How to reach the agent: Consul's HTTP flags and CONSUL_* environment variables."""

    scheme: str = "http"  # http, https or unix
    address: str = "127.0.0.1:8500"  # host:port, or the socket path for unix
    path_prefix: str = ""
    token: str = field(default="", repr=False)
    ca_file: str = ""
    ca_path: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    datacenter: str = ""
    stale: bool = False

    @property
    def display_address(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.address}"
        return f"{self.scheme}://{self.address}{self.path_prefix}"


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_bool(raw)
    except ValueError:
        raise ConfigError(f"Could not parse {name}: {raw!r} is not a boolean") from None


def load_http_options(values: Mapping[str, Any], env: Mapping[str, str]) -> HTTPOptions:
    """Resolve the HTTP flags against the environment, with Consul's precedence.

    The flag wins over the environment variable. Token: `-token-file` > `-token` >
    `CONSUL_HTTP_TOKEN_FILE` > `CONSUL_HTTP_TOKEN` > `CONNECT_PROXY_TOKEN` (the token
    Consul 1.2-1.5 gave managed proxies). Token files are read once and trimmed.

    Raises:
        ConfigError: an unknown scheme, an unreadable token file, a bad boolean.
    """

    def pick(flag: str, var: str, default: str = "") -> str:
        value = values.get(flag)
        if isinstance(value, str) and value:
            return value
        return env.get(var) or default

    addr = pick("http-addr", "CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    scheme = "https" if _env_bool(env, "CONSUL_HTTP_SSL") else "http"
    prefix = ""
    if "://" in addr:
        given, addr = addr.split("://", 1)
        if given not in ("http", "https", "unix"):
            raise ConfigError(f"Unknown protocol scheme: {given}")
        if given != "http":  # as Go: never revert to http once TLS was asked for
            scheme = given
    if scheme != "unix" and "/" in addr:
        addr, slash, rest = addr.partition("/")
        prefix = (slash + rest).rstrip("/")
    if not addr:
        raise ConfigError("-http-addr: empty address")

    def read_token(path: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise ConfigError(f"Error loading token file {path} : {exc.strerror or exc}") from exc

    # Consul 1.2-1.5 put CONNECT_PROXY_TOKEN into the -token flag when it was empty.
    token_flag = str(values.get("token") or "") or env.get("CONNECT_PROXY_TOKEN", "")
    if values.get("token-file"):
        token = read_token(str(values["token-file"]))
    elif token_flag:
        token = token_flag
    elif env.get("CONSUL_HTTP_TOKEN_FILE"):
        token = read_token(env["CONSUL_HTTP_TOKEN_FILE"])
    else:
        token = env.get("CONSUL_HTTP_TOKEN", "")

    auth = None
    raw_auth = env.get("CONSUL_HTTP_AUTH")
    if raw_auth:
        user, _, password = raw_auth.partition(":")
        auth = (user, password)
    verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY")
    server_name = pick("tls-server-name", "CONSUL_TLS_SERVER_NAME")
    if server_name.startswith("[") and "]:" in server_name:
        server_name = server_name[1 : server_name.index("]:")]  # [::1]:8501 -> ::1
    elif server_name.count(":") == 1:
        server_name = server_name.split(":", 1)[0]
    stale = values.get("stale")
    return HTTPOptions(
        scheme=scheme,
        address=addr,
        path_prefix=prefix,
        token=token,
        ca_file=pick("ca-file", "CONSUL_CACERT"),
        ca_path=pick("ca-path", "CONSUL_CAPATH"),
        client_cert=pick("client-cert", "CONSUL_CLIENT_CERT"),
        client_key=pick("client-key", "CONSUL_CLIENT_KEY"),
        tls_server_name=server_name,
        tls_skip_verify=verify is False,
        basic_auth=auth,
        datacenter=str(values.get("datacenter") or ""),
        stale=bool(stale) if isinstance(stale, bool) else False,
    )
