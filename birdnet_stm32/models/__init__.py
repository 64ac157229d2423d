"""Keras models: the in-graph frontend layers (:mod:`.frontend`) and the DS-CNN builder (:mod:`.dscnn`)."""
