"""Conversations between roles: the persona pools they start from, the records they leave, and the engine that
runs them."""
