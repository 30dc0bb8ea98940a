"""Training one MVControlNet stage: the trainer (`trainer`), checkpoints (`checkpoint`),
the weight EMA (`ema`) and the metrics log and loss curve (`log`)."""
