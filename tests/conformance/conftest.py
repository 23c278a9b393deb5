"""`reference`: the uninterrupted run of a workload, made once per session and shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conformance.harness import Reference, run_reference


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Reference]:
    made: dict[tuple[str, int], Reference] = {}

    def get(workload: str, num_workers: int = 0) -> Reference:
        key = (workload, num_workers)
        if key not in made:
            run_dir = tmp_path_factory.mktemp(f"reference-{workload}-w{num_workers}") / "run"
            made[key] = run_reference(workload, run_dir, num_workers=num_workers)
        return made[key]

    return get
