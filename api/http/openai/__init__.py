"""The OpenAI-compatible front door: ``/v1/chat/completions`` and ``/v1/responses`` over tokenfan generations.

An app built on the official ``openai`` SDK changes its ``base_url`` and keeps its code; every request it
makes becomes a tokenfan generation (queued, run by a worker, stored in its session's stream, watchable,
resumable, cancellable from anywhere).

* `bodies` (pure): OpenAI request bodies checked and turned into a generation request;
* `chunks` (pure): a generation's events as ``chat.completion.chunk`` SSE events, or one ``chat.completion``;
* `responses_events` (pure): the same events as Responses API events with gap-free sequence numbers, and
  the Response object;
* `failures` (pure): how a generation that did not complete is told in OpenAI's terms;
* `follow`: one generation followed over the live engine (`api.live.subscriber.Subscriber`);
* `routes`: the FastAPI routes, thin.
"""

__all__: list[str] = []
