"""kvtide.cluster.replica: the replica actor process and its shard actors. The engine's Ray
executor, the shards (one TP rank of one PP stage each), their placement and restarts, and the
publisher of load and KV events. Never imports ``kvtide.cluster.frontend``."""
