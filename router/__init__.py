"""kvtide.router: pure routing logic (prefix index, cost, policies); no Ray, no gRPC."""
