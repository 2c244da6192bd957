"""One Flax NNX decoder for the Llama-like families, its configs, weights I/O and sharding rules."""
