"""Export to STM32N6: int8 post-training quantization (:mod:`.quantize`), flatbuffer audit (:mod:`.audit`) and fidelity checks (:mod:`.validate`)."""
