"""The exception tree of connect-proxy.

    ProxyError
    ├── ConfigError          bad flags, env or agent-provided configuration
    ├── AgentError           talking to the local Consul agent
    │   ├── AgentUnavailable     transport failure: refused, reset, timed out
    │   └── AgentResponseError   the agent answered, but not with what we needed
    ├── TLSMaterialError     a leaf, key or roots bundle that cannot be used
    └── IdentityError        a SPIFFE ID that does not parse or does not match

This module imports nothing from the project.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error connect-proxy raises on purpose."""


class ConfigError(ProxyError):
    """Configuration that cannot be used; the message names the field."""


class AgentError(ProxyError):
    """A failure talking to the local agent."""


class AgentUnavailable(AgentError):
    """The agent could not be reached."""


class AgentResponseError(AgentError):
    """The agent answered with an error status or a body we cannot use."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TLSMaterialError(ProxyError):
    """Certificates or keys that cannot be loaded or do not chain."""


class IdentityError(ProxyError):
    """A SPIFFE identity that does not parse, or is not the one expected."""
