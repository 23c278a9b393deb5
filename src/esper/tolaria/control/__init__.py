"""Control: the unified LR controller (the only writer of LRs), the optimizer manager that rebuilds
without losing momentum, multi-seed gradient aggregation, circuit breakers, conservative mode.

Owns: how a step updates the model. May import `esper.contracts` and `esper.leyline` only.
"""
