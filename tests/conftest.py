"""Test-session setup shared by every test file.

All TensorFlow tests run in this one pytest process (``import tensorflow`` costs ~10 s). Before any test touches
TensorFlow, the CPU is split into two logical devices so ``tf.distribute.MirroredStrategy`` can be tested on a
machine without GPUs. This must happen before TensorFlow initializes its devices, hence ``pytest_configure``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
os.environ.setdefault("DISABLE_MKDOCS_2_WARNING", "true")


def pytest_configure(config):
    try:
        import tensorflow as tf
    except ImportError:
        return
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
