"""The embedded demo model (``models/demo``) and the script that trains it."""
