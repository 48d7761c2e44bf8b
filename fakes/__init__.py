"""Stand-ins for the world outside the project that the tests and the benchmarks share: a
Clever-shaped API (``fakes.clever_api``). Never shipped (the package is not in the wheel), and
importing nothing of the project: what it serves is Clever's side of the contract only."""
