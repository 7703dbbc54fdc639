"""Weight transport from the learner to the rollout engines (below actors/ and learner/; imports neither)."""
