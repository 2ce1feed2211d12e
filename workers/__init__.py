"""What runs on Ray workers: models, attacks, the pool actor, MID, train loops, evaluation."""
