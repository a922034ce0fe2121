"""Test helpers, one module per concern: the system as real processes (`stack`), subscribers that wait on
frames (`watchers`, `sse`), requests and expected replies (`requests`), proof of exact delivery
(`delivery`), waiting and cleanup (`waiting`), a TLS proxy for Redis (`tls`) and worker hooks (`hooks`)."""
