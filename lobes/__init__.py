"""Shared building blocks of the recipes (one concept per module)."""
