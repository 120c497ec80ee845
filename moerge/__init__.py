"""moerge: the command-line entry point tying merge/, router/ and serving/ together."""

__version__ = "0.1.0"
