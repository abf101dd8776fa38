"""Mixture-of-experts layers: the experts implementation transformers MoE models call."""
