"""Online multi-turn RL (`aloe-jax rl`): rollouts of the policy against the simulated user on the conversation
engine, judge-rewarded, and GRPO updates on the tree-packed rollouts with the shared trainer (docs/DESIGN.md §8)."""
