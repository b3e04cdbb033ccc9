"""kvtide.cluster.bench: ``kvtide bench``, the load generator that measures a serving endpoint
(kvtide's gRPC API or any OpenAI-compatible HTTP server) and writes records, plots and a report.

The public surface is ``cli.add_parser`` / ``cli.run`` (the subcommand) and the run directory
it writes (``run.py`` says what is in it). Inside, by concern:

- workloads: ``corpus`` (prose cut to exact token counts), ``workloads`` (ISL/OSL patterns,
  shared prefix, multi-turn), ``traces`` (bench JSONL, Mooncake, Azure; scaling),
  ``workload_args`` (the options that build one);
- load: ``load`` (closed loop, Poisson open loop, trace replay), ``backends`` (gRPC) and
  ``http_backend`` (OpenAI over httpx, ``sse`` parsing), ``records`` (timing one request);
- results: ``stats``, ``plots``, ``report``, ``profile`` (the engine cost profile);
- ``echo_server``: a trivial streaming server to measure the client itself.
"""
