"""Learner: ad encoder, projector, model artifacts and the periodic cycle."""
