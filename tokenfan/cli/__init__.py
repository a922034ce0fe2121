"""The top floor: the ``tokenfan`` command, `tokenfan up`, child-process supervision, the embedded Redis
and the OpenAI-compatible simulator. Nothing below imports it."""
