"""AlexNet on ImageNet in JAX/Flax NNX."""

__version__ = "0.1.0"
