"""The restore side of a migration: what the destination host's agent does."""
