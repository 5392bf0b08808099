"""The HTTP service (see the service issue); shares models/ with training."""
