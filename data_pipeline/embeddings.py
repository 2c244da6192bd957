"""Moved to `aloe_jax.models.sentence_encoder` (the evaluation and the conversation layer use it too); this name is
kept for existing imports."""

from aloe_jax.models.sentence_encoder import *  # noqa: F401,F403
from aloe_jax.models.sentence_encoder import MINILM_INSTALL, MINILM_PACKAGE, SentenceEncoder, minilm_dir  # noqa: F401
