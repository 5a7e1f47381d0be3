"""Quality benchmark of the served models: task scorers (``eval.scorers``), standard library only."""
