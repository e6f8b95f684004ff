"""Recipes: the schema, its converters and defaults, and what may change on resume."""
