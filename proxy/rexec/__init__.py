"""`connect-proxy exec`: Consul's `consul exec` (remote execution over KV and user events).

`client` holds the agent calls with the Go client's error texts; `command` the flags, the
flow, the results loop and the exit codes. The agent side is the dev agent's
`proxy/devagent/remote_exec.py`.
"""
