"""Writing-Zero (Jia et al. 2025, arXiv 2506.00103): a pairwise generative reward model (GenRM),
a Bradley-Terry scalar reward model, GRPO and BRPO advantages, PPO-clip policy losses and a
data-parallel policy-gradient step.

    genrm.py         judge prompt, score parsing, GenRM rewards, position-consistency filters
    reward_model.py  scalar reward head, Bradley-Terry loss, reward-quantile data filter
    advantages.py    GRPO, Dr. GRPO, RLOO and BRPO advantages, dynamic-sampling mask
    losses.py        token log-probs, PPO-clip, KL estimators, entropy, masked aggregation
    train.py         train state and the jitted, sharded policy-gradient step
"""
