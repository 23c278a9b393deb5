"""Esper: morphogenetic training. Tolaria (orchestrator), Kasmina (execution), Tamiyo (controller),
Oona (bus) and Leyline (contracts)."""

__version__ = "0.1.0"
