"""`python -m esper.tolaria` is the same CLI as `tolaria` (torchrun uses this form)."""

from esper.tolaria.cli import main

raise SystemExit(main())
