"""``python -m worker.cli``: how `grassroots run` starts its children, with this interpreter."""

from worker.cli import main

main()
