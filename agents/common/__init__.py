"""What every agent shares: tensor replay of logged transitions, masked Q-learning helpers."""
