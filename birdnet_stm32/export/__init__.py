"""Export to STM32N6: int8 quantization (:mod:`.quantize`), audit (:mod:`.audit`), fidelity (:mod:`.validate`)."""
