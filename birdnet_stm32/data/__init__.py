"""Datasets: class-folder discovery, grouped split, feature cache and ``tf.data`` pipelines; synthetic demo data."""
