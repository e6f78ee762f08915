"""Bring your own logs: ``python -m feedsr.prepare`` turns flat impression logs (plus item and
member tables) into the dataset layout the trainer reads, with point-in-time features compiled to
DuckDB SQL. Imports feedsr.data only; nothing in feedsr.data imports it."""
