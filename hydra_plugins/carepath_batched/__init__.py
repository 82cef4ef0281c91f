"""carepath's Hydra launcher that trains the members of a sweep as one stacked model (``hydra/launcher=batched``)."""
