"""Training: losses, rewards, the stage-1 and stage-2 steps, rollouts,
checkpoints and the trainer loop. Imports core, data and retrieval."""
