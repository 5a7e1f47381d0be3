"""The ``mixserve`` command (``mixserve.cli``): serve, merge, tune, eval, demo-train, example.

It lives outside ``server/`` so that the online service does not import the trainer or the
evaluator; each subcommand imports its modules lazily.
"""
