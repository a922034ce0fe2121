"""Floor 1, process plumbing every component shares: settings, structured logs, authentication, serving."""
