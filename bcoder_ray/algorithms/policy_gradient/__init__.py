"""PPO and GRPO (`algorithm`) and their loss math (`losses`)."""
