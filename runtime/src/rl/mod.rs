//! Reinforcement learning from rewards: reward functions and models ([`rewards`]) and the
//! advantage estimators of GRPO and PPO ([`advantages`]). The rollouts come from
//! [`crate::generate::rollout`] (the training weights, no copy); the losses are in
//! [`crate::loss::policy`] and the trainers in [`crate::train::rl`].

pub mod advantages;
pub mod rewards;

pub use advantages::{gae, group_advantages, masked_whiten, ScaleRewards};
pub use rewards::{builtin, reward_fn, Completion, ExactAnswer, LengthPenalty, RegexMatch, RewardFn, RewardModel, Rewards};
