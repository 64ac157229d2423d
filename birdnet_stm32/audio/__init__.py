"""Audio input: decoding, resampling, chunking (:mod:`.io`) and host-side spectrograms (:mod:`.features`)."""
