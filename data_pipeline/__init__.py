"""Data generation for ALOE: persona pools (original sources, self-generation with a near-duplicate filter), the
MiniLM sentence encoder in JAX, and conversation-tree generation."""
