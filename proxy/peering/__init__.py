"""`connect-proxy peering`: Consul's `peering` commands as an HTTP client of any agent.

`client` holds the calls (`/v1/peering/*` with the Go client's error texts); `command` the
subcommands `generate-token`, `establish`, `read`, `list`, `delete`: flags, output, exit
codes.
"""
