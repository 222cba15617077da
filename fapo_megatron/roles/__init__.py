"""Worker roles the trainer places on devices: each composes a Megatron actor, engines and judges on one rank."""
