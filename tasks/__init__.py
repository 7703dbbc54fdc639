"""Task code below the processes: the synthetic tasks, math data, evaluation, warm start and tiny model.

Rollout actors, the learner and the driver may import it; it imports none of them.
"""
