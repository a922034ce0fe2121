"""Everything that produces events: the arq job, the upstream adapter, coalescing, the stream writer."""
