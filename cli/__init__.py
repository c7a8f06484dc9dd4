"""subcache's command line: thin click commands over the library (`python -m cli` or `subcache`)."""
