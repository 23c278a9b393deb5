"""Recovery conformance suite: every workload, every checkpoint, every kill point resumes exactly."""
