"""Recipes built from the core: the demo, born-again networks, and classical (scikit-learn) students."""
