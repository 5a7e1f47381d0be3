"""Quality benchmark of the served models: task scorers (``mixserve.eval.scorers``), standard library only."""
