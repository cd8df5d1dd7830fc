"""The ``kvmflow`` command line."""
