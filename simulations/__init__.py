"""fedlora tasks, the simulation entry point, experiments and benchmarks."""
