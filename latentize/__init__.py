"""latentize: turn image shards into VAE latents or VQ indices with Ray Data."""

__version__ = "0.1.0"

__all__ = ["__version__"]
