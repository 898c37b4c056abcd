"""gradsketch: sketch gradients and Hessian-vector products of PyTorch models."""

__version__ = "0.1.0"
