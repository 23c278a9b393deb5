"""State: what a snapshot is: the `Snapshot` value, the registry of stateful components (each
section's key and restore order), RNG state, and the run's position and identity.

Owns: the content of rollbacks and checkpoints, not when they happen. May import
`esper.contracts` and torch only.
"""
