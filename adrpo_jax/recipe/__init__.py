"""The layer between the models / train kit and the domain trainers: one policy builder, one recipe base, one runner.

  policy   ``PolicySpec`` -> ``Policy``: trained and frozen parts, LoRA, reference, sampling copy, init, export
  base     ``Recipe`` (what a kind of run declares) and the registry of ``config.trainer`` names
  runner   ``run(config, workdir, mode)``: ``train`` | ``eval`` | ``plan`` for every recipe

See ``docs/architecture.md`` for the picture.
"""
