"""The default configs, installed as the package `aloe_jax.configs` (see pyproject.toml); read them by name through
`aloe_jax.core.config` (`load_config(cls, "runs/llama3-8b-sft-v5p-8")`)."""
