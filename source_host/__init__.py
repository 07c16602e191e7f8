"""The save side of a migration: what the source host's agent does."""
