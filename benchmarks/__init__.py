"""Benchmarks: each module's ``main()`` prints figures as ratios to a reference measured in the same run."""
