"""Serving-side engine layer: the continuous-batching scheduler and grammar constraints."""
