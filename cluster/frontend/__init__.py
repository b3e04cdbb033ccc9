"""kvtide.cluster.frontend: the frontend process. The gateway (validate, admit, route, stream,
detokenize), the gRPC and OpenAI HTTP servers over it, metrics, and the replica handles with the
one feed of liveness and loads into the router. Never imports ``kvtide.cluster.replica``."""
