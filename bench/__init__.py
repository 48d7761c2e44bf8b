"""The benchmarks (``bench/README.md``), each a module run from the repository's root
(``python -m bench.sync``; ``make bench``), and the synthetic district generator. On top of the
layers: they may use the runtime, the units of work and the tables; nothing imports them."""
