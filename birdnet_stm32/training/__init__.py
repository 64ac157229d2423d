"""Training: LR range test (:mod:`.lr_finder`), LR schedules (:mod:`.schedules`) and the trainer (:mod:`.trainer`)."""
