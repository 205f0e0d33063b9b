"""LoRA fine-tuning of Sa2VA: configuration, LoRA wrapping, the training loop, checkpoints and artefacts.

Plain Python (no Kedro); heavy imports stay inside functions. Entry points:
``config.load_training_config``, ``prepare.prepare_for_training``, ``trainer.train``,
``artifacts.save_trained_model`` / ``artifacts.load_trained_model``.
"""
