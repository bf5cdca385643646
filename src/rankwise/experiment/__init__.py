"""The main job: tasks and data, the training loop, reports and the ``finetune`` subcommand."""
