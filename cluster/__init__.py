"""kvtide.cluster: the composition root: Ray actors, servers, state, CLI."""
