"""HTTP routes of the dev agent: Consul's paths, parameters, headers and status codes.

    app         create_app: the one route table, Consul's 405s, error rendering
    wire        Consul's HTTP conventions: token, blocking parameters, bodies, JSON answers
    agent       /v1/agent/self, services, checks; /v1/status/*
    catalog     /v1/catalog/*, /v1/health/*, /v1/query/*
    connect     CA roots and configuration, leaves, authorize, legacy managed proxy
    intentions  /v1/connect/intentions/*, /v1/config/*
    acl         /v1/acl/*
    kv          /v1/kv/*
    session     /v1/session/*, /v1/event/*

Rule 1: no business logic here; a handler reads the request, calls the state table that
owns the data, and renders. Decisions, ACL filtering and indexes belong to the tables.
Rule 2: error bodies are plain text, like Consul's; nothing a client sends can crash the
server (every handler failure becomes a status code) and no token value is ever logged.
"""

from __future__ import annotations

from proxy.devagent.http.app import create_app
from proxy.devagent.http.wire import Settings

__all__ = ["Settings", "create_app"]
