"""Training data: the preference-tree record schema, tokenisation into tree-packed sequences, grain pipelines."""
