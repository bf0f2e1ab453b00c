"""The only package that imports ``tritonclient``: client, embedded-server launcher, codecs."""
