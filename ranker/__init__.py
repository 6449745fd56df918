"""Ranker: retrieval, Thompson-sampling scoring, propensities, A/B arms; the serving service."""
