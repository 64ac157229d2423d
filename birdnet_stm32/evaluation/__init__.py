"""Evaluation: metrics (:mod:`.metrics`), chunk-to-file pooling (:mod:`.pooling`) and the evaluate command (:mod:`.evaluate`)."""
