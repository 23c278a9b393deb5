"""esper.tamiyo: strategic controllers (the reference heuristic policy)."""

from esper.tamiyo.heuristic import HeuristicTamiyo, TamiyoConfig

__all__ = ["HeuristicTamiyo", "TamiyoConfig"]
