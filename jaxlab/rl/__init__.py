"""Writing-Zero (Jia et al. 2025, arXiv 2506.00103) and RL for jaxlab's causal LMs: a pairwise
generative reward model (GenRM), a Bradley-Terry scalar reward model, GRPO and BRPO advantages,
PPO-clip policy losses, a data-parallel policy-gradient step, supervised training, and the RL loop.

    advantages.py    GRPO, Dr. GRPO, RLOO and BRPO advantages, dynamic-sampling mask
    losses.py        token log-probs, PPO-clip, KL estimators, entropy, masked aggregation
    train.py         OptimizerConfig, the train state and the jitted, sharded policy-gradient step
    scaffold.py      the resumable loop every training job runs (restore, record, save, stop)
    sft.py           supervised training (SFT, any loss over arrays or a stream of batches)
    rollout.py       sampled traces -> the policy step's batch
    loop.py          the RL loop: sample, reward, advantages, train (GRPO, BRPO, ...)
    genrm.py         judge prompt, score parsing, GenRM rewards, position-consistency filters
    reward_model.py  scalar reward head, Bradley-Terry loss, reward-quantile data filter
"""
