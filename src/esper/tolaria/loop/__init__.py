"""The run: `TolariaTrainer` (fit, epoch, step), the epoch boundary and Tamiyo handshake, the hook
points, and the wiring that builds every component from the narrow dependencies it uses.

Owns: the training loop and the composition of a run. The only package that holds (or imports)
the trainer. May import every other `esper.tolaria` package, `esper.contracts`, `esper.leyline`,
and (in `build`) Kasmina, Tamiyo and Oona implementations.
"""
