"""What a device serves its user with: the cold-start choice, the stack its own held-out
lines favour, the user's recent lines as context, and generation."""
