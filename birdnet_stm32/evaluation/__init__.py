"""Evaluation: metrics (:mod:`.metrics`), chunk-to-file pooling (:mod:`.pooling`), ``evaluate`` (:mod:`.evaluate`)."""
