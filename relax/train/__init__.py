"""Training: warm-up data and SFT, GRPO (rollout, reward, advantage, update), filtering, checkpoints.

Python entry points (the CLI and ``relax demo`` call these):

- ``relax.train.warmup.self_solutions`` / ``build_warmup_examples``: warm-up data.
- ``relax.train.sft.train_sft(model, params, examples, cfg) -> params``.
- ``relax.train.filter.filter_problems(llm, llm_params, tokenizer, problems, cfg, grade)``.
- ``relax.train.grpo_train.train_grpo(model, params, problems, cfg, rollout, verifier, encode, ...)``.
- Maths: ``relax.train.rewards`` (difficulty_aware, simple, accuracy) and
  ``relax.train.grpo`` (group_advantages, policy_loss, ...); token log-probs
  without [B, T, V] logits in ``relax.train.logprobs`` (sequence_stats).
- Shared machinery: ``optim`` (AdamW and its schedule), ``sharding`` (where a run's
  arrays live on the mesh), ``update`` (the update step), ``run`` (``TrainRun``: resume,
  checkpoints, metrics, clean stops).
- Configs: ``relax.train.config`` (SampleConfig, SFTConfig, FilterConfig, GRPOConfig),
  read from the YAML presets in configs/ by ``relax.config``.
"""
