"""Research tooling: cost accounting, balanced cuts, gradient alignment, sweeps, the benchmark suites,
their analysis and plots."""
