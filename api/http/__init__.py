"""The HTTP request API (FastAPI): accept generations, report them, serve SSE."""
