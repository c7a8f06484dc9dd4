"""`python -m subcache …` is the `subcache` command (also under `torchrun -m subcache …`)."""
from subcache.cli.main import main

main()
