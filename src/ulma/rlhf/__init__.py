"""RLHF, the paper's baseline (§3.2): a reward model fitted to feedback, then PPO.

- :mod:`ulma.rlhf.losses`  pure tensor functions: reward-model losses (Eq. 2, 7, 9) and
  the pieces of PPO on the KL-regularised objective (Eq. 3): per-token KL, shaped
  rewards, GAE, whitening, clipped policy and value losses, entropy.
- :mod:`ulma.rlhf.reward`  ``method: reward`` -- trains a scalar reward model and saves it
  as an ``AutoModelForSequenceClassification`` folder; :class:`~ulma.scoring.RewardScorer`
  scores (prompt, response) *text* with the reward model's own tokenizer.
- :mod:`ulma.rlhf.ppo`     ``method: rlhf`` -- PPO with LoRA, a value head and a KL
  penalty to the reference (the base with adapters disabled).
"""
