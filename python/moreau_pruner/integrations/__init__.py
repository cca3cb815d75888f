"""Moreau pruning inside the compressors people already run.

* :mod:`.llmcompressor`: ``MoreauPruningModifier``, a modifier for llm-compressor recipes
  (registered under that name when the module is imported).
* :mod:`.torch_pruning`: ``MoreauImportance`` and ``TaylorImportance`` for Torch-Pruning's
  ``MetaPruner`` (MLP channels and hidden size).

Each is imported on its own (``import moreau_pruner.integrations.llmcompressor``), so that importing
``moreau_pruner`` never needs the compressors; a missing compressor gives an ImportError that says how
to install it.
"""
