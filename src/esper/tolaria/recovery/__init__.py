"""Recovery: RAM snapshots with copy-behind, the two-phase rollback and its participants, restore
plans, step and boundary monitors, the four-level emergency protocol and its handlers, and the
shared-memory emergency signal.

Owns: deciding that training went bad and putting it back. May import `checkpoint`, `control`,
`observe`, `state`, the shared leaves, `esper.contracts` and `esper.leyline`; never `loop`.
"""
