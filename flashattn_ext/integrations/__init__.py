"""Integrations with other libraries. Each submodule imports its library lazily, when used: importing
flashattn_ext never needs them.

- ``flashattn_ext.integrations.transformers``: ``register()`` makes ``attn_implementation="fa_ext"`` available to
  Hugging Face transformers models.
- ``flashattn_ext.integrations.unpad``: padding masks -> packed ``attention_varlen`` calls (used by the above;
  needs no transformers).
"""
