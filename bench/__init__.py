"""v4jax performance benchmarks (spec/performance.md targets P1, P2, P6, P7). Run: python -m bench all --quick"""
