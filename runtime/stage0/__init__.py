"""Stage 0's coordination: the peers' bring-up, the scheduler of batch passes, stage 0's own
forward, and the speculation each request decodes with."""
