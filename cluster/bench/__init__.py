"""kvtide.cluster.bench: ``kvtide bench``, the load generator that measures a serving endpoint
(kvtide's gRPC API or any OpenAI-compatible HTTP server) and writes records, plots and a report."""
