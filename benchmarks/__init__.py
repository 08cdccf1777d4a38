"""probekit's benchmark suite (issue 5): ``python -m benchmarks [--quick]``; see README.md here."""
