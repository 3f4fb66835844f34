"""xsae: study what neural networks learn, across models."""

__version__ = "0.1.0"
