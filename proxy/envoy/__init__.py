"""`connect-proxy envoy`: Consul's `connect envoy` (`command` flags, agent look-ups, FIFO, exec
and fallback) over a pure bootstrap renderer (`bootstrap`)."""
