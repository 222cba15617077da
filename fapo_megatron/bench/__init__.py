"""Where a training step's time goes: the measured breakdown of a run (`fapo-megatron bench breakdown`) and a cost
model that predicts it for a recipe on N nodes before a job is submitted (`fapo-megatron bench predict`)."""
