"""One module per `fapo-megatron` subcommand."""
