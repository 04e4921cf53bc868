"""Built-in YAML recipes, usable by name anywhere a pipeline is accepted."""
