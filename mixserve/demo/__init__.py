"""The embedded demo model (its files in this package's directory: ``base/``, ``adapters/``, ``pins.yaml``) and the
script that trains it (``mixserve.demo.train``; not imported here)."""
