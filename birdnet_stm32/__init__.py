"""birdnet_stm32: train bird-sound classifiers for the STM32N6 NPU.

The pipeline, in the order data flows through it:

* :mod:`birdnet_stm32.audio` — decode, resample, chunk and turn audio into spectrograms;
* :mod:`birdnet_stm32.data` — discover class folders, split, cache features, build ``tf.data`` pipelines;
* :mod:`birdnet_stm32.models` — in-graph frontend and the DS-CNN builder;
* :mod:`birdnet_stm32.training` — LR range test, schedules and the trainer;
* :mod:`birdnet_stm32.export` — int8 post-training quantization, STM32N6 audit, fidelity report;
* :mod:`birdnet_stm32.evaluation` — chunk- and file-level metrics for ``.keras`` and ``.tflite`` models.

Importing the package does not import TensorFlow.
"""

__version__ = "0.1.0"
