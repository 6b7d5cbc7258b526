"""Latent dataset QA: statistics, scale check, alignment, codebook usage, reconstructions."""
