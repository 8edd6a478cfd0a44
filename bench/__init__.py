"""lmforge's benchmark suite: scripts that print ratios against baselines measured in the same run.
`python -m bench` (or bench/run_cpu.sh) runs the CPU suite; docs/benchmarks.md records the figures."""
