"""MoreauPruner for LLaMA-family models."""
