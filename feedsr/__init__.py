"""feedsr: Feed-SR-style transformer sequential ranking, trained end to end."""

__version__ = "0.1.0"
