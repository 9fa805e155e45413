"""TLS for the listeners: a TLS engine per connection over memory buffers, the contexts
that configure it, and the asyncio transport that drives it.

Modules, lowest first: `engine` (the interface, the stdlib engine, the engine names),
`openssl` (the pyOpenSSL engine), `contexts` (building and checking contexts, an engine
per context), `transport` (TLS over a TCP transport, with half-close).

Rule 1: nothing here knows a listener, the agent or an identity; from `proxy/` these modules
take only `proxy.errors`. The listeners above use them; `proxy.tlsstore` builds through them.
"""

from __future__ import annotations

__all__: list[str] = []
