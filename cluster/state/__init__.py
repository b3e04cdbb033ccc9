"""kvtide.cluster.state: the cluster's shared state in Redis (the store both the frontend and
the replicas use) and the embedded redis-server."""
