"""LLM roles (user simulator, extractor, responders, judges, persona generator) on any ChatBackend."""
