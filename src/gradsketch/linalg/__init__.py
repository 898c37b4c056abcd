"""Algorithms on linear operators; knows nothing of models."""

from .operator import DampedOperator, FunctionOperator, LinearOperator, MatrixOperator

__all__ = ["LinearOperator", "MatrixOperator", "FunctionOperator", "DampedOperator"]
