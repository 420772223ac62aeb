"""The one decode loop and what it draws on: sampling, drafters, the window policy, targets."""
