"""subcache's command line: thin click commands over the library. Installed as ``subcache.cli`` (setup.cfg maps this
folder there); run it as `subcache` or `python -m subcache`."""
