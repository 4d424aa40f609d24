"""Model components: quantiser, VAE, visual decoder, projectors, the unified model."""
